"""The report's segmentation parts: per-class IoU, and one validation image's predicted masks beside the truth.

Workers record, per run, the first validation image, its true mask and the run's predicted mask (grayscale PNGs
of class indices, `seg_preview` in the run's environment: workers/segmentation.py); here the masks are coloured
with one palette (class → colour, ignored pixels light grey) and inlined as data URIs (the report's CSP allows
`img-src data:`).
"""

from __future__ import annotations

import base64
import binascii
import html
import io
import re
from typing import Any

from PIL import Image, UnidentifiedImageError

from app.core import catalogue
from app.core.dataset_format import IGNORE_LABEL
from app.tables import Dataset

# Okabe–Ito, then further distinct colours; classes beyond the list cycle through it.
_RGB = bytes.fromhex("000000 e69f00 56b4e9 009e73 f0e442 0072b2 d55e00 cc79a7 999999 800000 008080 808000")
PALETTE = [tuple(_RGB[i : i + 3]) for i in range(0, len(_RGB), 3)]
IGNORED = (235, 235, 235)
IOU_PREFIX = "val_iou/"  # workers.segmentation.IOU_PREFIX
_MAX_PNG_CHARS = 200_000  # a stored preview larger than this is not shown (they are at most 96×96)


def _palette() -> list[int]:
    flat = [c for i in range(256) for c in PALETTE[i % len(PALETTE)]]
    flat[3 * IGNORE_LABEL : 3 * IGNORE_LABEL + 3] = IGNORED
    return flat


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def coloured_mask(b64: object) -> str | None:
    """A stored grayscale class-index PNG as a palette PNG data URI; None when it is not a small valid PNG."""
    if not isinstance(b64, str) or len(b64) > _MAX_PNG_CHARS:
        return None
    try:
        im = Image.open(io.BytesIO(base64.b64decode(b64, validate=True)), formats=["PNG"])
        if im.mode != "L":
            return None
        out = Image.frombytes("P", im.size, im.tobytes())
    except (binascii.Error, UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        return None  # not what a worker wrote: the cell shows a dash
    out.putpalette(_palette())
    buf = io.BytesIO()
    out.save(buf, format="PNG")
    return _data_uri(buf.getvalue())


def image_uri(b64: object) -> str | None:
    if not isinstance(b64, str) or len(b64) > _MAX_PNG_CHARS or not re.fullmatch(r"[A-Za-z0-9+/=]*", b64):
        return None
    return "data:image/png;base64," + b64


def _img(uri: str | None, alt: str) -> str:
    if uri is None:
        return '<span class="small">—</span>'
    return f'<img class="mask" src="{uri}" alt="{html.escape(alt)}" title="{html.escape(alt)}">'


def _legend(class_names: list[str]) -> str:
    items = []
    for i, name in enumerate(class_names[:24]):
        r, g, b = PALETTE[i % len(PALETTE)]
        items.append(
            f'<span class="small"><span style="display:inline-block;width:10px;height:10px;'
            f'background:rgb({r},{g},{b});border:1px solid #999"></span> {html.escape(name)}</span>'
        )
    return " &nbsp; ".join(items)


def _iou_table(runs: list[Any], class_names: list[str]) -> str:
    """Per-class IoU (%) by variant and batch size, averaged over the succeeded seeds."""
    cells: dict[tuple[str, int], dict[int, list[float]]] = {}
    for r in runs:
        for name, value in (r.final_metrics or {}).items():
            if name.startswith(IOU_PREFIX) and name[len(IOU_PREFIX) :].isdigit() and isinstance(value, int | float):
                cells.setdefault((r.variant, r.batch_size), {}).setdefault(int(name[len(IOU_PREFIX) :]), []).append(
                    float(value)
                )
    if not cells:
        return ""
    classes = sorted({c for per in cells.values() for c in per})
    head = "".join(f"<th>{html.escape(class_names[c] if c < len(class_names) else str(c))}</th>" for c in classes)
    out = [f'<table><thead><tr><th class="l">variant · batch</th>{head}</tr></thead><tbody>']
    for (v, b), per in sorted(cells.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        tds = "".join(f"<td>{100 * sum(per[c]) / len(per[c]):.1f}</td>" if c in per else "<td>—</td>" for c in classes)
        out.append(f'<tr><td class="l">{html.escape(v)} · {b}</td>{tds}</tr>')
    out.append("</tbody></table>")
    return "".join(out)


def segmentation_section(runs: list[Any], dataset: Dataset | None) -> str:
    """The predicted masks of one validation image per (batch size × variant), the first finished seed's run,
    beside the image and its truth; then the per-class IoU. Empty for other datasets."""
    if dataset is None or dataset.kind != "segmentation":
        return ""
    names = list(dataset.class_names)
    previews = {}
    for r in sorted(runs, key=lambda r: r.seed):
        p = (r.environment or {}).get("seg_preview")
        if isinstance(p, dict) and (r.variant, r.batch_size) not in previews:
            previews[(r.variant, r.batch_size)] = p
    variants = list(dict.fromkeys(r.variant for r in sorted(runs, key=lambda r: r.variant_index)))
    batches = sorted({r.batch_size for r in runs})
    out = [
        '<section class="card" id="segmentation"><h2>Predicted masks and per-class IoU</h2>',
        "<style>img.mask{width:96px;height:auto;image-rendering:pixelated;border:1px solid #ccc}</style>",
        '<p class="small">The first validation image, its true mask and each variant\'s predicted mask after the '
        "last epoch (eval mode; the lowest finished seed of each cell). Colours: "
        f"{_legend(names)}; ignored pixels light grey.</p>",
    ]
    first = next(iter(previews.values()), None)
    if first is None:
        out.append('<p class="small">No run has finished yet.</p>')
    else:
        out.append(
            '<table><thead><tr><th class="l">batch</th><th>image</th><th>truth</th>'
            + "".join(f"<th>{html.escape(v)}</th>" for v in variants)
            + "</tr></thead><tbody>"
        )
        image, truth = image_uri(first.get("image")), coloured_mask(first.get("truth"))
        for b in batches:
            preds = "".join(
                f"<td>{_img(coloured_mask((previews.get((v, b)) or {}).get('pred')), f'{v} at batch {b}')}</td>"
                for v in variants
            )
            out.append(
                f'<tr><td class="l">{b}</td><td>{_img(image, "validation image")}</td>'
                f"<td>{_img(truth, 'true mask')}</td>{preds}</tr>"
            )
        out.append("</tbody></table>")
    out.append(_iou_table(runs, names))
    out.append("</section>")
    return "".join(out)


_TEXT = re.compile(r">([^<]+)<")


def relabel_page(page: str, metric: str) -> str:
    """The report's text nodes (never its attributes, ids or links) name the primary metric instead of accuracy."""
    if metric == "val_acc":
        return page
    label = catalogue.METRIC_LABELS.get(metric, metric)
    return _TEXT.sub(lambda m: ">" + m.group(1).replace("accuracy", label).replace("Accuracy", label) + "<", page)
