"""Segmentation in the engine: the per-pixel loss, confusion matrices → IoU metrics, and a predicted-mask preview.

Masks are uint8 (N, H, W) on the device with `IGNORE_LABEL` (255) on ignored pixels; logits are (N, K, H, W),
the class dimension 1. The loss is written with log_softmax and gather (ops vmap batches natively, on every
device) and equals `F.cross_entropy(logits, y, ignore_index=255)` (the mean over the batch's counted pixels).
"""

from __future__ import annotations

import base64
import io
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from app.core.dataset_format import IGNORE_LABEL

PREVIEW_SIDE = 96  # stored previews are at most this many pixels on a side (nearest-neighbour downsampled)
IOU_PREFIX = "val_iou/"


def pixel_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the pixels whose mask is not IGNORE_LABEL (0 when every pixel is ignored)."""
    y = y.long()
    valid = y != IGNORE_LABEL
    target = torch.where(valid, y, torch.zeros_like(y)).unsqueeze(1)
    nll = -F.log_softmax(logits.float(), 1).gather(1, target).squeeze(1)
    counted = valid.to(nll.dtype)
    return (nll * counted).sum() / counted.sum().clamp(min=1.0)


def confusion(pred: torch.Tensor, y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(M, K, K) counts, truth along rows, prediction along columns, per model; pred (M, N, H, W), y (N, H, W)."""
    y = y.long().unsqueeze(0).expand_as(pred)
    valid = y != IGNORE_LABEL
    idx = torch.where(valid, y * num_classes + pred, torch.zeros_like(y)).flatten(1)
    out = torch.zeros(pred.shape[0], num_classes * num_classes, dtype=torch.long, device=pred.device)
    out.scatter_add_(1, idx, valid.flatten(1).long())
    return out.view(-1, num_classes, num_classes)


@torch.no_grad()
def evaluate(
    fwd: Any, params: Any, buffers: Any, fed: Any, xs: torch.Tensor, ys: torch.Tensor, k: int, num_classes: int
) -> tuple[list[float], list[float], torch.Tensor]:
    """Pixel accuracy, mean loss per counted pixel and confusion matrices (k, K, K) of k stacked models on (xs,
    ys), in chunks of about a million pixels per model; `fwd` is the vmapped forward over the models."""
    pixels = int(np.prod(xs.shape[2:]))
    chunk = max(1, 2**20 // max(1, k * pixels))
    cm = torch.zeros(k, num_classes, num_classes, dtype=torch.long, device=xs.device)
    loss_sum = torch.zeros(k, device=xs.device)
    for i in range(0, len(xs), chunk):
        logits = fwd(params, buffers, fed(xs[i : i + chunk]))  # (k, n, K, H, W)
        y = ys[i : i + chunk]
        cm += confusion(logits.argmax(2), y, num_classes)
        for j in range(k):  # the same arithmetic as the training loss, summed instead of averaged
            valid = (y != IGNORE_LABEL).sum()
            loss_sum[j] += pixel_loss(logits[j], y) * valid
    counted = cm.sum((1, 2)).clamp(min=1)
    acc = cm.diagonal(dim1=1, dim2=2).sum(1) / counted
    return acc.tolist(), (loss_sum / counted).tolist(), cm


def iou_metrics(cm: torch.Tensor | np.ndarray, prefix: str = "val") -> dict[str, float]:
    """`<prefix>_miou` (mean over classes present in truth or prediction) and, for validation, each such class's
    `val_iou/<index>` (the report names the classes)."""
    cm = np.asarray(cm.cpu() if isinstance(cm, torch.Tensor) else cm, dtype=np.float64)
    tp = np.diag(cm)
    union = cm.sum(0) + cm.sum(1) - tp
    seen = union > 0
    out = {f"{prefix}_miou": float((tp[seen] / union[seen]).mean()) if seen.any() else 0.0}
    if prefix == "val":
        for c in np.nonzero(seen)[0]:
            out[f"{IOU_PREFIX}{c}"] = float(tp[c] / union[c])
    return out


def _png(arr: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", optimize=True)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _shrink(arr: np.ndarray) -> np.ndarray:
    """Nearest-neighbour downsampling to at most PREVIEW_SIDE pixels a side (masks keep their class values)."""
    h, w = arr.shape[:2]
    step = max(1, -(-max(h, w) // PREVIEW_SIDE))
    return arr[::step, ::step]


def mask_png(mask: torch.Tensor | np.ndarray) -> str:
    """A (H, W) class-index mask as a base64 grayscale PNG of the indices (IGNORE_LABEL stays 255)."""
    m = mask.cpu().numpy() if isinstance(mask, torch.Tensor) else mask
    return _png(_shrink(np.ascontiguousarray(m, dtype=np.uint8)))


def image_png(image: torch.Tensor) -> str:
    """A stored uint8 (C, H, W) image as a base64 PNG (grayscale or RGB; a 4th channel is dropped)."""
    a = image.cpu().numpy()
    a = a[0] if a.shape[0] == 1 else a[:3].transpose(1, 2, 0)
    return _png(_shrink(np.ascontiguousarray(a)))


@torch.no_grad()
def previews(
    fwd: Any, params: Any, buffers: Any, fed: Any, x_val: torch.Tensor, y_val: torch.Tensor
) -> list[dict[str, Any]]:
    """For the first validation image: each model's predicted mask (eval mode) beside the image and its truth."""
    logits = fwd(params, buffers, fed(x_val[:1]))  # (k, 1, K, H, W)
    common = {"val_index": 0, "image": image_png(x_val[0]), "truth": mask_png(y_val[0])}
    return [{**common, "pred": mask_png(p[0])} for p in logits.argmax(2)]
