"""A generated segmentation dataset with known masks: textured shapes on a textured background, made offline.

Each image holds 1-3 shapes (disc, square, triangle: classes 1-3; background 0) of random size and place. Every
class has its own texture (stripes at its own angle and period) in a random tint, over a noisy background texture,
so a pixel's class is told by its local pattern and the shape's outline, not by its colour alone.

    .venv/bin/python bench/make_shapes_seg.py OUT.npz [--n 240] [--size 32] [--seed 0]
    .venv/bin/python bench/make_shapes_seg.py OUT.zip ...   (images/ and masks/ PNGs, classes.txt)
"""

from __future__ import annotations

import argparse
import io
import zipfile
from pathlib import Path

import numpy as np

CLASS_NAMES = ["background", "disc", "square", "triangle"]
# Stripe angle (radians) and period (pixels) of each class's texture; the background's is noise plus stripes.
TEXTURES = {0: (0.0, 7.0), 1: (0.0, 3.0), 2: (np.pi / 2, 3.0), 3: (np.pi / 4, 4.0)}


def _texture(cls: int, size: int, rng: np.random.Generator) -> np.ndarray:
    angle, period = TEXTURES[cls]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    phase = rng.uniform(0, 2 * np.pi)
    wave = 0.5 + 0.5 * np.sin(2 * np.pi * (xx * np.cos(angle) + yy * np.sin(angle)) / period + phase)
    tint = rng.uniform(0.3, 1.0, size=3)
    return wave[..., None] * tint[None, None, :]


def _shape_mask(cls: int, size: int, rng: np.random.Generator) -> np.ndarray:
    r = rng.uniform(0.15, 0.3) * size
    cy, cx = rng.uniform(r, size - r, size=2)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    if cls == 1:
        return np.asarray((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r)
    if cls == 2:
        return np.asarray((np.abs(yy - cy) <= r * 0.85) & (np.abs(xx - cx) <= r * 0.85))
    # An upward triangle: below the apex, inside both slanted edges.
    top = cy - r
    inside = (yy >= top) & (yy <= cy + r) & (np.abs(xx - cx) <= (yy - top) * 0.6)
    return np.asarray(inside)


def shapes(n: int = 240, size: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(x uint8 (N, H, W, 3), y uint8 (N, H, W)) with classes 0..3 as CLASS_NAMES."""
    rng = np.random.default_rng(seed)
    xs = np.empty((n, size, size, 3), dtype=np.uint8)
    ys = np.zeros((n, size, size), dtype=np.uint8)
    for i in range(n):
        img = 0.6 * _texture(0, size, rng) + 0.4 * rng.uniform(0, 1, size=(size, size, 1))
        mask = np.zeros((size, size), dtype=np.uint8)
        for cls in rng.choice([1, 2, 3], size=rng.integers(1, 4), replace=False):
            m = _shape_mask(int(cls), size, rng)
            img = np.where(m[..., None], _texture(int(cls), size, rng), img)
            mask[m] = cls
        noisy = img + rng.normal(0, 0.05, size=img.shape)
        xs[i] = np.clip(np.rint(noisy * 255), 0, 255).astype(np.uint8)
        ys[i] = mask
    return xs, ys


def write_zip(path: Path, x: np.ndarray, y: np.ndarray) -> None:
    from PIL import Image

    with zipfile.ZipFile(path, "w") as zf:
        for i, (img, mask) in enumerate(zip(x, y, strict=True)):
            for folder, arr in (("images", img), ("masks", mask)):
                buf = io.BytesIO()
                Image.fromarray(arr).save(buf, format="PNG")
                zf.writestr(f"{folder}/{i:05d}.png", buf.getvalue())
        zf.writestr("classes.txt", "\n".join(CLASS_NAMES) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--n", type=int, default=240)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    x, y = shapes(a.n, a.size, a.seed)
    if a.out.suffix == ".zip":
        write_zip(a.out, x, y)
    else:
        np.savez(a.out, x=x, y=y, class_names=np.asarray(CLASS_NAMES))
    counts = np.bincount(y.ravel(), minlength=len(CLASS_NAMES)) / y.size
    print(f"wrote {a.out}: {a.n} images {a.size}×{a.size}, pixel shares " + ", ".join(f"{c:.2f}" for c in counts))


if __name__ == "__main__":
    main()
