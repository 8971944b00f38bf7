"""Tests for app.ingest (upload validation and conversion) and app.core.dataset_format (the stored form)."""

from __future__ import annotations

import io
import stat
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from app.core.dataset_format import CanonicalDataset, load_canonical, save_canonical
from app.ingest import IngestError, IngestLimits, ingest_file

RNG = np.random.default_rng(0)
LABELS = np.array([0, 1, 2, 0, 1, 2], dtype=np.int64)


# ------------------------------------------------------------------------------------------ helpers


def write_npz(tmp_path: Path, name: str = "data.npz", **arrays: object) -> Path:
    path = tmp_path / name
    with path.open("wb") as f:
        np.savez(f, **arrays)
    return path


def ingest_npz(tmp_path: Path, **arrays: object) -> CanonicalDataset:
    return ingest_file(write_npz(tmp_path, **arrays), "data.npz")


def png_bytes(arr: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def write_zip(tmp_path: Path, entries: dict[str, bytes], name: str = "imgs.zip") -> Path:
    path = tmp_path / name
    with zipfile.ZipFile(path, "w") as zf:
        for entry, data in entries.items():
            zf.writestr(entry, data)
    return path


def write_csv(tmp_path: Path, text: str, name: str = "data.csv") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def error_of(path: Path, filename: str, **kwargs: object) -> str:
    with pytest.raises(IngestError) as info:
        ingest_file(path, filename, **kwargs)  # type: ignore[arg-type]
    return str(info.value)


# ------------------------------------------------------------------------------------------- npz


def test_npz_nhw_uint8_becomes_single_channel(tmp_path: Path) -> None:
    x = RNG.integers(0, 256, size=(6, 5, 7), dtype=np.uint8)
    ds = ingest_npz(tmp_path, x=x, y=LABELS)
    assert ds.kind == "image"
    assert ds.x.dtype == np.uint8 and ds.x.flags.c_contiguous
    np.testing.assert_array_equal(ds.x, x[:, None, :, :])
    assert ds.shape == (1, 5, 7)
    assert ds.y.dtype == np.int64
    np.testing.assert_array_equal(ds.y, LABELS)
    assert ds.class_names == ["0", "1", "2"]
    assert ds.num_classes == 3 and ds.num_samples == 6
    assert ds.split_sizes == {"train": 6}


def test_npz_nhwc_uint8_is_transposed(tmp_path: Path) -> None:
    x = RNG.integers(0, 256, size=(6, 5, 7, 3), dtype=np.uint8)
    ds = ingest_npz(tmp_path, x=x, y=LABELS)
    np.testing.assert_array_equal(ds.x, x.transpose(0, 3, 1, 2))
    assert ds.shape == (3, 5, 7)


def test_npz_nchw_uint8_kept(tmp_path: Path) -> None:
    x = RNG.integers(0, 256, size=(6, 3, 5, 7), dtype=np.uint8)
    ds = ingest_npz(tmp_path, x=x, y=LABELS)
    np.testing.assert_array_equal(ds.x, x)
    assert ds.shape == (3, 5, 7)


def test_npz_float_unit_images_scaled_to_uint8(tmp_path: Path) -> None:
    x = RNG.random((6, 4, 4, 1)).astype(np.float32)
    ds = ingest_npz(tmp_path, x=x, y=LABELS.astype(np.float64))  # integral float labels are accepted
    expected = np.rint(x * 255).astype(np.uint8).transpose(0, 3, 1, 2)
    np.testing.assert_array_equal(ds.x, expected)
    assert ds.x.dtype == np.uint8
    assert ds.y.dtype == np.int64


def test_npz_float_byte_range_images_rounded(tmp_path: Path) -> None:
    x = RNG.random((6, 3, 5, 6)) * 255.0
    ds = ingest_npz(tmp_path, x=x, y=LABELS)
    np.testing.assert_array_equal(ds.x, np.rint(x).astype(np.uint8))


def test_npz_float_images_out_of_range_refused(tmp_path: Path) -> None:
    x = RNG.standard_normal((6, 4, 4)).astype(np.float32)
    path = write_npz(tmp_path, x=x, y=LABELS)
    assert "float images must be in [0,1] or [0,255]" in error_of(path, "data.npz")


def test_npz_ambiguous_4d_layout_refused(tmp_path: Path) -> None:
    path = write_npz(tmp_path, x=np.zeros((6, 5, 5, 5), np.uint8), y=LABELS)
    assert "(N, H, W, C) or (N, C, H, W)" in error_of(path, "data.npz")


def test_npz_tabular(tmp_path: Path) -> None:
    x = RNG.standard_normal((6, 4))
    names = np.array(["cat", "dog", "eel"])
    ds = ingest_npz(tmp_path, x=x, y=LABELS.astype(np.int32), class_names=names)
    assert ds.kind == "tabular"
    assert ds.x.dtype == np.float32
    np.testing.assert_allclose(ds.x, x.astype(np.float32))
    assert ds.shape == (4,)
    assert ds.class_names == ["cat", "dog", "eel"]


def test_npz_with_val_and_test_splits(tmp_path: Path) -> None:
    x = RNG.integers(0, 256, size=(6, 4, 4, 3), dtype=np.uint8)
    xv = RNG.random((3, 4, 4, 3))
    xt = RNG.integers(0, 256, size=(2, 4, 4, 3), dtype=np.uint8)
    ds = ingest_npz(tmp_path, x=x, y=LABELS, x_val=xv, y_val=[0, 1, 2], x_test=xt, y_test=[2, 2])
    assert ds.split_sizes == {"train": 6, "val": 3, "test": 2}
    assert ds.x_val is not None and ds.x_test is not None
    assert ds.x_val.shape == (3, 3, 4, 4) and ds.x_val.dtype == np.uint8
    np.testing.assert_array_equal(ds.x_val, np.rint(xv * 255).astype(np.uint8).transpose(0, 3, 1, 2))
    np.testing.assert_array_equal(ds.x_test, xt.transpose(0, 3, 1, 2))
    np.testing.assert_array_equal(ds.y_test, [2, 2])
    assert ds.y_val is not None and ds.y_val.dtype == np.int64


def test_npz_split_shape_mismatch_names_both_shapes(tmp_path: Path) -> None:
    path = write_npz(
        tmp_path, x=np.zeros((6, 4, 4), np.uint8), y=LABELS, x_val=np.zeros((2, 5, 4), np.uint8), y_val=[0, 1]
    )
    msg = error_of(path, "data.npz")
    assert "x_val has shape (2, 5, 4) but x has shape (6, 4, 4)" in msg


def test_npz_split_label_out_of_range(tmp_path: Path) -> None:
    path = write_npz(tmp_path, x=np.zeros((6, 4)), y=LABELS, x_test=np.zeros((2, 4)), y_test=np.array([0, 7]))
    assert "y_test contains label 7" in error_of(path, "data.npz")


def test_npz_split_without_labels_refused(tmp_path: Path) -> None:
    path = write_npz(tmp_path, x=np.zeros((6, 4)), y=LABELS, x_val=np.zeros((2, 4)))
    assert "'x_val' but no 'y_val'" in error_of(path, "data.npz")


def test_save_load_round_trip(tmp_path: Path) -> None:
    ds = CanonicalDataset(
        kind="image",
        x=RNG.integers(0, 256, size=(6, 3, 4, 4), dtype=np.uint8),
        y=LABELS.copy(),
        class_names=["ant", "bee", "cow"],
        x_val=RNG.integers(0, 256, size=(2, 3, 4, 4), dtype=np.uint8),
        y_val=np.array([1, 2], dtype=np.int64),
    )
    out = tmp_path / "canon.npz"
    save_canonical(ds, out)
    assert [p.name for p in tmp_path.iterdir()] == ["canon.npz"]  # no temp file left behind
    with np.load(out, allow_pickle=False) as raw:
        assert set(raw.files) == {"x", "y", "class_names", "kind", "x_val", "y_val"}
        assert raw["class_names"].dtype.kind == "U"
    back = load_canonical(out)
    assert back.kind == "image"
    assert back.class_names == ["ant", "bee", "cow"]
    np.testing.assert_array_equal(back.x, ds.x)
    np.testing.assert_array_equal(back.y, ds.y)
    np.testing.assert_array_equal(back.x_val, ds.x_val)
    np.testing.assert_array_equal(back.y_val, ds.y_val)
    assert back.x_test is None and back.y_test is None
    assert back.split_sizes == {"train": 6, "val": 2}


def test_ingest_then_save_load_tabular(tmp_path: Path) -> None:
    ds = ingest_npz(tmp_path, x=RNG.standard_normal((6, 3)), y=LABELS)
    save_canonical(ds, tmp_path / "c.npz")
    back = load_canonical(tmp_path / "c.npz")
    assert back.kind == "tabular" and back.x.dtype == np.float32
    np.testing.assert_array_equal(back.x, ds.x)
    assert back.class_names == ["0", "1", "2"]


def test_npz_length_mismatch_names_both_shapes(tmp_path: Path) -> None:
    path = write_npz(tmp_path, x=np.zeros((6, 4, 4), np.uint8), y=LABELS[:5])
    assert "x has shape (6, 4, 4) but y has shape (5,)" in error_of(path, "data.npz")


def test_npz_single_class_refused(tmp_path: Path) -> None:
    path = write_npz(tmp_path, x=np.zeros((4, 3)), y=np.zeros(4, np.int64))
    assert "only one class" in error_of(path, "data.npz")


def test_npz_class_with_one_sample_named(tmp_path: Path) -> None:
    path = write_npz(tmp_path, x=np.zeros((5, 3)), y=np.array([0, 0, 1, 1, 2]))
    assert "class 2 has 1 training sample(s)" in error_of(path, "data.npz")


def test_npz_negative_label_refused(tmp_path: Path) -> None:
    path = write_npz(tmp_path, x=np.zeros((4, 3)), y=np.array([-1, -1, 1, 1]))
    assert "negative label -1" in error_of(path, "data.npz")


def test_npz_nan_refused(tmp_path: Path) -> None:
    x = np.ones((6, 3))
    x[2, 1] = np.nan
    path = write_npz(tmp_path, x=x, y=LABELS)
    assert "NaN or infinite values (first at row 2, column 1)" in error_of(path, "data.npz")


def test_npz_object_array_refused(tmp_path: Path) -> None:
    y = np.array([0, 1, 2, 0, 1, "x"], dtype=object)
    path = write_npz(tmp_path, x=np.zeros((6, 3)), y=y)
    assert "dtype object" in error_of(path, "data.npz")


def test_npz_missing_y(tmp_path: Path) -> None:
    path = write_npz(tmp_path, x=np.zeros((6, 3)), labels=LABELS)
    msg = error_of(path, "data.npz")
    assert "no array named 'y'" in msg and "'labels'" in msg


def test_npz_with_wrong_magic(tmp_path: Path) -> None:
    path = write_csv(tmp_path, "a,b\n1,2\n", name="fake.npz")
    assert "does not start with the zip signature" in error_of(path, "fake.npz")


# ------------------------------------------------------------------------------------------- zip


def _gray(h: int = 4, w: int = 5, value: int | None = None) -> np.ndarray:
    if value is not None:
        return np.full((h, w), value, np.uint8)
    return RNG.integers(0, 256, size=(h, w), dtype=np.uint8)


def _rgb(h: int = 4, w: int = 5) -> np.ndarray:
    return RNG.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def test_zip_png_rgb_class_folders(tmp_path: Path) -> None:
    imgs = {name: _rgb() for name in ("dogs/a.png", "dogs/b.png", "cats/1.png", "cats/2.png")}
    entries = {name: png_bytes(a) for name, a in imgs.items()}
    entries["__MACOSX/cats/._1.png"] = b"junk"
    entries["cats/.DS_Store"] = b"junk"
    ds = ingest_file(write_zip(tmp_path, entries), "imgs.zip")
    assert ds.kind == "image"
    assert ds.class_names == ["cats", "dogs"]
    assert ds.shape == (3, 4, 5)
    np.testing.assert_array_equal(ds.y, [0, 0, 1, 1])
    order = ["cats/1.png", "cats/2.png", "dogs/a.png", "dogs/b.png"]
    np.testing.assert_array_equal(ds.x, np.stack([imgs[n].transpose(2, 0, 1) for n in order]))


def test_zip_grayscale_jpeg_with_top_level_folder(tmp_path: Path) -> None:
    entries = {
        f"root/{cls}/{i}.jpg": png_bytes(_gray(8, 8, value=40 * k + 10 * i), "JPEG")
        for k, cls in enumerate(("b", "a"))
        for i in range(3)
    }
    entries["root/"] = b""
    ds = ingest_file(write_zip(tmp_path, entries), "imgs.zip")
    assert ds.class_names == ["a", "b"]
    assert ds.x.shape == (6, 1, 8, 8) and ds.x.dtype == np.uint8
    np.testing.assert_array_equal(ds.y, [0, 0, 0, 1, 1, 1])
    assert abs(int(ds.x[4, 0, 3, 3]) - 10) <= 2  # b/1.jpg (flat 10), allowing for JPEG loss


def test_zip_mixed_gray_and_rgb_becomes_rgb(tmp_path: Path) -> None:
    g1, g2, c1, c2 = _gray(), _gray(), _rgb(), _rgb()
    entries = {
        "top/a/1.png": png_bytes(g1),
        "top/a/2.jpeg": png_bytes(c1, "JPEG"),
        "top/b/1.png": png_bytes(c2),
        "top/b/2.png": png_bytes(g2),
    }
    ds = ingest_file(write_zip(tmp_path, entries), "imgs.zip")
    assert ds.x.shape == (4, 3, 4, 5)
    np.testing.assert_array_equal(ds.x[0], np.stack([g1] * 3))
    np.testing.assert_array_equal(ds.x[2], c2.transpose(2, 0, 1))
    np.testing.assert_array_equal(ds.x[3], np.stack([g2] * 3))


def test_zip_path_traversal_refused(tmp_path: Path) -> None:
    entries = {"cats/1.png": png_bytes(_gray()), "../evil.png": png_bytes(_gray())}
    assert "'..'" in error_of(write_zip(tmp_path, entries), "imgs.zip")


def test_zip_symlink_refused(tmp_path: Path) -> None:
    path = tmp_path / "imgs.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("cats/1.png", png_bytes(_gray()))
        link = zipfile.ZipInfo("cats/2.png")
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(link, "/etc/passwd")
    assert "symbolic link" in error_of(path, "imgs.zip")


def test_zip_mismatched_sizes_names_file(tmp_path: Path) -> None:
    entries = {
        "cats/1.png": png_bytes(_gray(4, 5)),
        "cats/2.png": png_bytes(_gray(4, 5)),
        "dogs/1.png": png_bytes(_gray(4, 5)),
        "dogs/2.png": png_bytes(_gray(6, 5)),
    }
    msg = error_of(write_zip(tmp_path, entries), "imgs.zip")
    assert "image 'dogs/2.png' is 5×6 but 'cats/1.png' is 5×4" in msg


def test_zip_non_image_entry_refused(tmp_path: Path) -> None:
    entries = {"cats/1.png": png_bytes(_gray()), "cats/notes.txt": b"hello"}
    assert "'cats/notes.txt' is not a PNG/JPEG image" in error_of(write_zip(tmp_path, entries), "imgs.zip")


def test_zip_broken_image_named(tmp_path: Path) -> None:
    entries = {
        "cats/1.png": png_bytes(_gray()),
        "cats/2.png": png_bytes(_gray()),
        "dogs/1.png": png_bytes(_gray())[:40],
        "dogs/2.png": png_bytes(_gray()),
    }
    assert "'dogs/1.png'" in error_of(write_zip(tmp_path, entries), "imgs.zip")


def test_zip_gif_disguised_as_png_refused(tmp_path: Path) -> None:
    buf = io.BytesIO()
    Image.new("L", (4, 5)).save(buf, format="GIF")
    entries = {n: png_bytes(_gray()) for n in ("a/1.png", "b/1.png", "b/2.png")}
    entries["a/2.png"] = buf.getvalue()
    assert "image 'a/2.png' is not a PNG or JPEG file" in error_of(write_zip(tmp_path, entries), "imgs.zip")


def test_zip_single_class_refused(tmp_path: Path) -> None:
    entries = {"cats/1.png": png_bytes(_gray()), "cats/2.png": png_bytes(_gray())}
    assert "at least 2 class folders" in error_of(write_zip(tmp_path, entries), "imgs.zip")


def test_zip_class_with_one_image_refused(tmp_path: Path) -> None:
    entries = {n: png_bytes(_gray()) for n in ("cats/1.png", "cats/2.png", "dogs/1.png")}
    assert "class folder 'dogs' has only 1 image" in error_of(write_zip(tmp_path, entries), "imgs.zip")


def test_zip_too_many_pixels_refused(tmp_path: Path) -> None:
    entries = {n: png_bytes(_gray(20, 20)) for n in ("a/1.png", "a/2.png", "b/1.png", "b/2.png")}
    limits = IngestLimits(max_image_pixels=100)
    assert "more than 100 pixels" in error_of(write_zip(tmp_path, entries), "imgs.zip", limits=limits)


# ------------------------------------------------------------------------------------------- csv


def test_csv_numeric_with_integer_labels(tmp_path: Path) -> None:
    text = "f1,label,f2\n0.5,0,1\n1.5,1,2\n-2,0,3e2\n4,1, 5 \n\n"
    ds = ingest_file(write_csv(tmp_path, text), "data.csv")
    assert ds.kind == "tabular" and ds.x.dtype == np.float32
    np.testing.assert_array_equal(ds.x, np.array([[0.5, 1], [1.5, 2], [-2, 300], [4, 5]], np.float32))
    np.testing.assert_array_equal(ds.y, [0, 1, 0, 1])
    assert ds.class_names == ["0", "1"]
    assert ds.shape == (2,)


def test_csv_string_labels_mapped_sorted(tmp_path: Path) -> None:
    rows = ["1,2,setosa", "3,4,virginica", "5,6,setosa", "7,8,versicolor", "9,1,virginica", "2,2,versicolor"]
    text = "a,b,species\n" + "\n".join(rows) + "\n"
    ds = ingest_file(write_csv(tmp_path, text), "iris.csv", label_column="species")
    assert ds.class_names == ["setosa", "versicolor", "virginica"]
    np.testing.assert_array_equal(ds.y, [0, 2, 0, 1, 2, 1])


def test_csv_one_based_integer_labels_renumbered(tmp_path: Path) -> None:
    text = "a,label\n1,1\n2,1\n3,2\n4,2\n"
    ds = ingest_file(write_csv(tmp_path, text), "data.csv")
    np.testing.assert_array_equal(ds.y, [0, 0, 1, 1])
    assert ds.class_names == ["1", "2"]


def test_csv_missing_label_column_lists_columns(tmp_path: Path) -> None:
    path = write_csv(tmp_path, "a,b,target\n1,2,0\n")
    msg = error_of(path, "data.csv")
    assert "label column 'label' not found" in msg
    assert "'a', 'b', 'target'" in msg


def test_csv_non_numeric_cell_names_row_and_column(tmp_path: Path) -> None:
    path = write_csv(tmp_path, "a,b,label\n1,2,0\n3,oops,1\n")
    msg = error_of(path, "data.csv")
    assert "row 3, column 'b'" in msg and "'oops'" in msg


def test_csv_nan_cell_refused(tmp_path: Path) -> None:
    path = write_csv(tmp_path, "a,b,label\n1,2,0\n3,nan,1\n1,2,0\n3,4,1\n")
    assert "row 3, column 'b'" in error_of(path, "data.csv")


def test_csv_row_cap(tmp_path: Path) -> None:
    path = write_csv(tmp_path, "a,label\n" + "1,0\n2,1\n" * 5)
    assert "more than 4 data rows" in error_of(path, "data.csv", limits=IngestLimits(max_csv_rows=4))


# ---------------------------------------------------------------------------------------- dispatch


def test_unknown_extension_lists_formats(tmp_path: Path) -> None:
    path = write_csv(tmp_path, "a,label\n1,0\n", name="data.txt")
    msg = error_of(path, "data.txt")
    assert "unsupported file type '.txt'" in msg
    assert ".npz" in msg and ".zip" in msg and ".csv" in msg


# ------------------------------------------------------------------------------ stored resolution limit


def test_images_over_the_side_limit_are_refused_and_at_it_kept(tmp_path: Path) -> None:
    """Images are stored at their own resolution up to IngestLimits.max_image_side (1024) on the longer side."""
    wide = {n: png_bytes(_gray(16, 1025)) for n in ("a/1.png", "a/2.png", "b/1.png", "b/2.png")}
    msg = error_of(write_zip(tmp_path, wide), "imgs.zip")
    assert "'a/1.png' is 1025×16 pixels, over the limit of 1024 pixels on the longer side" in msg
    assert "input.resize" in msg
    edge = {n: png_bytes(_gray(1024, 8)) for n in ("a/1.png", "a/2.png", "b/1.png", "b/2.png")}
    assert ingest_file(write_zip(tmp_path, edge, "edge.zip"), "edge.zip").shape == (1, 1024, 8)
    x = np.zeros((4, 1, 1100, 8), np.uint8)
    path = write_npz(tmp_path, x=x, y=np.array([0, 1, 0, 1]))
    assert "the images is 8×1100 pixels, over the limit of 1024" in error_of(path, "data.npz")
    limits = IngestLimits(max_image_side=8)
    assert "over the limit of 8 pixels" in error_of(write_zip(tmp_path, edge, "e2.zip"), "e2.zip", limits=limits)


def test_npz_compressed_sorted_labels_and_sparse_masks_are_accepted(tmp_path: Path) -> None:
    """Labels and masks compress 400-700× in real data (sorted labels, mostly-background masks): the ratio guard
    that refuses compression bombs among samples must not refuse them (their size is bounded by the total cap)."""
    x = RNG.standard_normal((40_000, 4)).astype(np.float32)
    y = np.sort(np.arange(40_000) % 3).astype(np.int64)  # 320 KB of int64 in a few hundred bytes
    path = tmp_path / "sorted.npz"
    np.savez_compressed(path, x=x, y=y)
    with zipfile.ZipFile(path) as zf:
        member = zf.getinfo("y.npy")
        assert member.file_size > 2**18 and member.file_size / member.compress_size > 200
    assert ingest_file(path, "sorted.npz").num_classes == 3

    images = RNG.integers(0, 256, (48, 160, 160, 3), dtype=np.uint8)
    masks = np.zeros((48, 160, 160), np.uint8)  # 1.2 MB of mostly background
    for i in range(48):
        masks[i, 20 + i : 40 + i, 30:50] = 1 + i % 2
    path = tmp_path / "masks.npz"
    np.savez_compressed(path, x=images, y=masks)
    with zipfile.ZipFile(path) as zf:
        member = zf.getinfo("y.npy")
        assert member.file_size > 2**20 and member.file_size / member.compress_size > 200
    ds = ingest_file(path, "masks.npz")
    assert ds.kind == "segmentation"
    np.testing.assert_array_equal(ds.y, masks)


def test_npz_label_member_over_the_decoded_cap_is_still_refused(tmp_path: Path) -> None:
    path = tmp_path / "labels_bomb.npz"
    np.savez_compressed(path, x=RNG.standard_normal((6, 4)), y=np.zeros(2**22, np.int64))  # 32 MiB of zeros
    assert "more than the limit" in error_of(path, "labels_bomb.npz", limits=IngestLimits(max_uncompressed_bytes=2**24))
