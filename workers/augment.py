"""Image augmentation: random flips and padded crops, drawn per epoch from (seed, epoch) and applied on
the device with static shapes (so the captured training step can apply them)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Augmentation:
    """One epoch's random flips and crop offsets, one entry per sample position of the epoch."""

    flip: torch.Tensor | None  # bool (N,)
    dy: torch.Tensor | None  # int64 (N,)
    dx: torch.Tensor | None
    padding: int

    def slice(self, start: int, stop: int) -> Augmentation:
        def cut(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[start:stop]

        return Augmentation(cut(self.flip), cut(self.dy), cut(self.dx), self.padding)


def augments(augment: dict[str, Any], kind: str) -> bool:
    """Whether a run with this augmentation spec augments data of this kind (images only)."""
    return kind == "image" and bool(augment.get("hflip") or augment.get("crop_padding"))


def epoch_augmentation(
    augment: dict[str, Any], seed: int, epoch: int, n: int, kind: str, device: torch.device
) -> Augmentation | None:
    """Augmentation draws for the n sample positions of one epoch: a function of (seed, epoch) only, like
    the data order, so a resumed run and a packed run see the same crops and flips as an uninterrupted one."""
    if not augments(augment, kind):
        return None
    hflip, padding = bool(augment.get("hflip")), int(augment.get("crop_padding", 0))
    g = torch.Generator().manual_seed((seed * 7919 + 1) * 1_000_003 + epoch)
    flip = (torch.rand(n, generator=g) < 0.5).to(device) if hflip else None
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=g).to(device) if padding else None
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=g).to(device) if padding else None
    return Augmentation(flip, dy, dx, padding)


def apply_augmentation(x: torch.Tensor, aug: Augmentation) -> torch.Tensor:
    """Flips and padded crops of a uint8 (N, C, H, W) batch with per-sample draws already on its device;
    only device ops with static shapes, so it runs inside a CUDA graph."""
    n, c, h, w = x.shape
    if aug.flip is not None:
        x = torch.where(aug.flip.view(n, 1, 1, 1), x.flip(3), x)
    if aug.padding and aug.dy is not None and aug.dx is not None:
        p = aug.padding
        padded = F.pad(x, (p, p, p, p))
        rows = (aug.dy.view(n, 1) + torch.arange(h, device=x.device)).view(n, 1, h, 1)
        cols = (aug.dx.view(n, 1) + torch.arange(w, device=x.device)).view(n, 1, 1, w)
        idx_n = torch.arange(n, device=x.device).view(n, 1, 1, 1)
        idx_c = torch.arange(c, device=x.device).view(1, c, 1, 1)
        x = padded[idx_n, idx_c, rows, cols]
    return x
