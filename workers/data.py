"""A job's dataset resident on the training device: uint8 images or float features, split once.

No DataLoader: batches are index slices of device tensors, augmented on the device.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from app.core.dataset_format import load_canonical

SPLIT_SEED = 20180322  # one validation split per dataset, the same for every run and seed


@dataclass
class DeviceData:
    kind: str
    x_train: torch.Tensor  # uint8 NCHW or float32 NF, on device
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    mean: torch.Tensor  # per channel (images) or feature (tabular), broadcastable to a batch
    std: torch.Tensor
    input_shape: tuple[int, ...]
    num_classes: int

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """Raw device batch → normalized float32, once per batch."""
        return (x.float() - self.mean) / self.std


def split_indices(num_samples: int, val_size: int) -> tuple[np.ndarray, np.ndarray]:
    perm = np.random.default_rng(SPLIT_SEED).permutation(num_samples)
    return np.sort(perm[val_size:]), np.sort(perm[:val_size])


def load_device_data(path: Path, budget: dict[str, int], device: torch.device) -> DeviceData:
    ds = load_canonical(path)
    x, y = ds.x, ds.y
    if ds.x_val is not None and ds.y_val is not None:
        x_tr, y_tr, x_va, y_va = x, y, ds.x_val, ds.y_val
    else:
        tr, va = split_indices(len(x), budget["val_size"])
        x_tr, y_tr, x_va, y_va = x[tr], y[tr], x[va], y[va]
    if len(x_tr) != budget["train_size"]:
        raise ValueError(f"dataset changed since submit: {len(x_tr)} training samples, expected {budget['train_size']}")
    xt = torch.from_numpy(np.ascontiguousarray(x_tr)).to(device)
    if ds.kind == "image":
        scaled = xt.float()
        mean = scaled.mean(dim=(0, 2, 3)).view(1, -1, 1, 1)
        std = scaled.std(dim=(0, 2, 3)).view(1, -1, 1, 1)
    else:
        mean = xt.mean(dim=0, keepdim=True)
        std = xt.std(dim=0, keepdim=True)
    std = torch.where(std > 1e-6, std, torch.ones_like(std))  # constant features stay constant
    return DeviceData(
        kind=ds.kind,
        x_train=xt,
        y_train=torch.from_numpy(y_tr).to(device),
        x_val=torch.from_numpy(np.ascontiguousarray(x_va)).to(device),
        y_val=torch.from_numpy(y_va).to(device),
        mean=mean,
        std=std,
        input_shape=tuple(ds.shape),
        num_classes=ds.num_classes,
    )


def epoch_order(seed: int, epoch: int, train_size: int, samples_per_epoch: int) -> torch.Tensor:
    """Sample order for one epoch: a function of (seed, epoch) only, so every variant and batch
    size with the same seed sees the same data in the same order."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(train_size, generator=g)[:samples_per_epoch]


def augment(x: torch.Tensor, hflip: bool, crop_padding: int, g: torch.Generator) -> torch.Tensor:
    """Random flips and padded crops of a uint8 NCHW batch, on its device."""
    n, _, h, w = x.shape
    if hflip:
        flip = (torch.rand(n, generator=g) < 0.5).to(x.device)
        x = torch.where(flip.view(n, 1, 1, 1), x.flip(3), x)
    if crop_padding:
        p = crop_padding
        padded = F.pad(x, (p, p, p, p))
        dy = torch.randint(0, 2 * p + 1, (n,), generator=g).to(x.device)
        dx = torch.randint(0, 2 * p + 1, (n,), generator=g).to(x.device)
        rows = (dy.view(n, 1) + torch.arange(h, device=x.device)).view(n, 1, h, 1)
        cols = (dx.view(n, 1) + torch.arange(w, device=x.device)).view(n, 1, 1, w)
        idx_n = torch.arange(n, device=x.device).view(n, 1, 1, 1)
        idx_c = torch.arange(x.shape[1], device=x.device).view(1, -1, 1, 1)
        x = padded[idx_n, idx_c, rows, cols]
    return x
