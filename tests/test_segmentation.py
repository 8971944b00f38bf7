"""Segmentation (issue 13 §1): image + mask uploads (zip of images/ and masks/, or .npz with (N, H, W) masks),
hostile masks refused with nothing stored, the U-Net with the zoo's norms, per-pixel loss and IoU in the engine,
and one job end to end through a real worker (upload → job → results → report with predicted masks)."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from app.core.dataset_format import IGNORE_LABEL, load_canonical, save_canonical
from app.ingest import IngestError, ingest_file
from bench.make_shapes_seg import CLASS_NAMES, shapes
from tests.factories import npz_bytes
from tests.test_hostile_input import harness  # noqa: F401  (the fixture)


def png(arr: np.ndarray, mode: str | None = None, palette: bool = False, fmt: str = "PNG") -> bytes:
    im = Image.fromarray(arr) if mode is None else Image.fromarray(arr, mode=mode)
    if palette:
        im = im.convert("P")
        im.putpalette([v for i in range(256) for v in (i * 3 % 256, i * 7 % 256, i * 11 % 256)])
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def seg_zip(entries: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return buf.getvalue()


def good_entries(n: int = 4, size: int = 16, palette: bool = False) -> dict[str, bytes]:
    x, y = shapes(n, size, seed=1)
    out: dict[str, bytes] = {}
    for i in range(n):
        out[f"images/{i}.png"] = png(x[i])
        out[f"masks/{i}.png"] = png(y[i], palette=palette)
    return out


def ingest_bytes(tmp_path: Path, name: str, data: bytes, **kw: Any) -> Any:
    path = tmp_path / name
    path.write_bytes(data)
    return ingest_file(path, name, **kw)


# --- ingest ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("palette", [False, True])
def test_a_zip_of_images_and_masks_is_segmentation(tmp_path: Path, palette: bool) -> None:
    entries = good_entries(palette=palette)
    entries["classes.txt"] = "\n".join(CLASS_NAMES).encode()
    ds = ingest_bytes(tmp_path, "s.zip", seg_zip(entries))
    x, y = shapes(4, 16, seed=1)
    assert ds.kind == "segmentation" and ds.class_names == CLASS_NAMES and ds.shape == (3, 16, 16)
    np.testing.assert_array_equal(ds.y, y)  # palette indices, not colours
    np.testing.assert_array_equal(ds.x, x.transpose(0, 3, 1, 2))
    save_canonical(ds, tmp_path / "c.npz")
    back = load_canonical(tmp_path / "c.npz")
    assert back.kind == "segmentation" and back.y.dtype == np.uint8 and back.y.shape == (4, 16, 16)


def test_an_npz_with_mask_labels_is_segmentation_and_ignore_is_remapped(tmp_path: Path) -> None:
    x, y = shapes(6, 16, seed=2)
    y = y.astype(np.int64)
    y[:, 0, :] = 99  # a border of ignored pixels
    ds = ingest_bytes(tmp_path, "s.npz", npz_bytes(x=x, y=y), ignore_index=99)
    assert ds.kind == "segmentation" and ds.num_classes == 4 and ds.class_names == ["0", "1", "2", "3"]
    assert (ds.y[:, 0, :] == IGNORE_LABEL).all() and int(ds.y[:, 1:, :].max()) <= 3
    with pytest.raises(IngestError, match=r"y\[0\] has class 99 at row 0, column 0.*pass ignore_index"):
        ingest_bytes(tmp_path, "s.npz", npz_bytes(x=x, y=y, class_names=np.asarray(CLASS_NAMES)))


def _hostile_zips() -> list[tuple[dict[str, bytes], dict[str, str], str]]:
    g = good_entries()
    big = np.zeros((16, 20), dtype=np.uint8)
    rgb = np.zeros((16, 16, 3), dtype=np.uint8)
    out = [
        ({**g, "masks/1.png": png(big)}, {}, "mask 'masks/1.png' is 20×16 but its image 'images/1.png' is 16×16"),
        ({k: v for k, v in g.items() if k != "masks/2.png"}, {}, "image 'images/2.png' has no mask in masks/"),
        ({**g, "masks/9.png": g["masks/0.png"]}, {}, "mask 'masks/9.png' has no image in images/"),
        (
            {**g, "masks/1.png": png(np.full((16, 16), 7, np.uint8)), "classes.txt": "\n".join(CLASS_NAMES).encode()},
            {},
            "mask 'masks/1.png' has class 7 at row 0, column 0, outside 0..3",
        ),
        ({**g, "masks/1.png": png(rgb)}, {}, "has RGB pixels; masks must be single-channel"),
        ({**g, "masks/1.jpg": png(rgb, fmt="JPEG")}, {}, "is not a PNG; masks must be lossless"),
        ({**g, "extra/readme.md": b"hi"}, {}, "is not where it belongs"),
        ({**g, "classes.txt": b"a\nb\n"}, {}, "outside 0..1 (class_names has 2)"),
        ({"images/0.png": g["images/0.png"], "masks/0.png": g["masks/0.png"]}, {}, "at least 2"),
    ]
    zero = {k: (png(np.zeros((16, 16), np.uint8)) if k.startswith("masks") else v) for k, v in g.items()}
    out.append((zero, {}, "segmentation needs at least 2 classes"))
    out.append((g, {"kind": "signal"}, "kind=signal needs a .npz"))
    return out


@pytest.mark.parametrize(("entries", "form", "needle"), _hostile_zips())
def test_hostile_mask_zips_store_nothing(
    harness: Any, entries: dict[str, bytes], form: dict[str, str], needle: str
) -> None:  # noqa: F811
    with harness() as h:
        h.refuse_upload("s.zip", seg_zip(entries), 422, needle, **form)


def test_mask_pixel_bombs_are_refused(harness: Any) -> None:  # noqa: F811
    g = good_entries()
    huge = png(np.zeros((3000, 3000), np.uint8))  # one flat colour: tiny file, millions of pixels
    with harness() as h:
        h.refuse_upload("s.zip", seg_zip({**g, "masks/1.png": huge}), 422, "masks/1.png")
    with harness(max_image_pixels=100) as h:
        h.refuse_upload("s.zip", seg_zip(g), 422, "pixels")


@pytest.mark.parametrize(
    ("arrays", "form", "needle"),
    [
        ({"y": np.zeros((4, 8, 8), np.int64)}, {}, "masks must be (N, H, W) = (4, 16, 16)"),
        ({"y": np.full((4, 16, 16), 1.5)}, {}, "masks must hold integer class indices"),
        ({"y": np.full((4, 16, 16), -1)}, {}, "has class -1 at row 0, column 0"),
        ({"y": np.arange(4 * 256).reshape(4, 16, 16)}, {}, "outside 0..254"),
        ({"y": np.zeros(4, np.int64)}, {"ignore_index": "255"}, "ignore_index applies to segmentation masks"),
        (
            {"x_val": np.zeros((2, 16, 16, 3), np.uint8), "y_val": np.zeros((2, 16, 17), np.int64)},
            {},
            "y_val has shape (2, 16, 17)",
        ),
    ],
)
def test_hostile_mask_npz_store_nothing(
    harness: Any, arrays: dict[str, Any], form: dict[str, str], needle: str
) -> None:  # noqa: F811
    x, y = shapes(4, 16, seed=3)
    arrays = {"x": x, "y": y, **arrays}
    with harness() as h:
        h.refuse_upload("s.npz", npz_bytes(**arrays), 422, needle, **form)
