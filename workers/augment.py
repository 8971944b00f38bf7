"""Image augmentation and feeding: random flips and padded crops, the job's resize and (random) crop, drawn per
epoch from (seed, epoch) and applied on the device with static shapes (so the captured training step can apply
them). Images stay resident at their stored resolution; `Feed` brings each batch to the network's input size."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from app.core import catalogue


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
    """Whether a run with this augmentation spec augments data of this kind (images, and segmentation's images
    with their masks)."""
    return kind in ("image", "segmentation") and bool(augment.get("hflip") or augment.get("crop_padding"))


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


def apply_augmentation(x: torch.Tensor, aug: Augmentation, fill: int = 0) -> torch.Tensor:
    """Flips and padded crops of a uint8 (N, C, H, W) batch with per-sample draws already on its device;
    only device ops with static shapes, so it runs inside a CUDA graph. `fill`: the padding's value (masks pad
    with their ignored label)."""
    n, c, h, w = x.shape
    if aug.flip is not None:
        x = torch.where(aug.flip.view(n, 1, 1, 1), x.flip(3), x)
    if aug.padding and aug.dy is not None and aug.dx is not None:
        p = aug.padding
        padded = F.pad(x, (p, p, p, p), value=fill)
        rows = (aug.dy.view(n, 1) + torch.arange(h, device=x.device)).view(n, 1, h, 1)
        cols = (aug.dx.view(n, 1) + torch.arange(w, device=x.device)).view(n, 1, 1, w)
        idx_n = torch.arange(n, device=x.device).view(n, 1, 1, 1)
        idx_c = torch.arange(c, device=x.device).view(1, c, 1, 1)
        x = padded[idx_n, idx_c, rows, cols]
    return x


def _crop_at(x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The h×w window of each (C, H, W) sample of x at its own (dy, dx): one gather, static shapes."""
    n, c = x.shape[:2]
    rows = (dy.view(n, 1) + torch.arange(h, device=x.device)).view(n, 1, h, 1)
    cols = (dx.view(n, 1) + torch.arange(w, device=x.device)).view(n, 1, 1, w)
    idx_n = torch.arange(n, device=x.device).view(n, 1, 1, 1)
    idx_c = torch.arange(c, device=x.device).view(1, c, 1, 1)
    return x[idx_n, idx_c, rows, cols]


@dataclass(frozen=True)
class Feed:
    """The job's `input` options for images of one stored size: resize (shorter side, bilinear with antialias,
    as torchvision's Resize(int)) then a square crop, centred at evaluation and at random positions in training
    when `random_crop`. Works on normalized float batches (N, C, H, W) on the device."""

    stored: tuple[int, int]
    size: tuple[int, int]  # after the resize (the stored size without one)
    crop: int | None
    random_crop: bool

    @classmethod
    def of(cls, spec: dict[str, Any], input_shape: tuple[int, ...], kind: str) -> Feed | None:
        """The feed of a run, or None when images go in as stored (or the data are not images)."""
        resize, crop = spec.get("resize"), spec.get("crop")
        if kind != "image" or (resize is None and crop is None):
            return None
        _, h, w = catalogue.fed_shape(input_shape, resize, None)
        catalogue.fed_shape(input_shape, resize, crop)  # raises if the crop does not fit
        return cls((input_shape[1], input_shape[2]), (h, w), crop, bool(spec.get("random_crop")))

    @property
    def room(self) -> tuple[int, int]:
        """How far a crop can move down and right."""
        if self.crop is None:
            return (0, 0)
        return (self.size[0] - self.crop, self.size[1] - self.crop)

    def _resize(self, x: torch.Tensor) -> torch.Tensor:
        if self.size == self.stored:
            return x
        return F.interpolate(x, size=self.size, mode="bilinear", align_corners=False, antialias=True)

    def eval(self, x: torch.Tensor) -> torch.Tensor:
        """Resize, then the centre crop (torchvision's CenterCrop offsets)."""
        x = self._resize(x)
        if self.crop is None:
            return x
        top, left = (int(round(r / 2.0)) for r in self.room)
        return x[:, :, top : top + self.crop, left : left + self.crop]

    def train(self, x: torch.Tensor, dy: torch.Tensor | None, dx: torch.Tensor | None) -> torch.Tensor:
        """Resize, then the crop at each sample's drawn offsets (`random_crop`), else the centre crop."""
        if not self.random_crop or self.crop is None or dy is None or dx is None:
            return self.eval(x)
        return _crop_at(self._resize(x), dy, dx, self.crop, self.crop)


def epoch_crops(
    feed: Feed, seed: int, epoch: int, n: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Random-crop offsets for the n sample positions of one epoch, a function of (seed, epoch) only (a stream
    of its own, so the flips and padded crops of `epoch_augmentation` stay what they were)."""
    if not feed.random_crop or feed.crop is None:
        return None
    g = torch.Generator().manual_seed((seed * 7919 + 2) * 1_000_003 + epoch)
    room_h, room_w = feed.room
    dy = torch.randint(0, room_h + 1, (n,), generator=g)
    dx = torch.randint(0, room_w + 1, (n,), generator=g)
    return dy.to(device), dx.to(device)
