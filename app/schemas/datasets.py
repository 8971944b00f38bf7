"""Dataset resources as the API shows them."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from app.schemas.common import UploadName, UtcTimestamp


class DatasetOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str = Field(description="Dataset id; built-in datasets use their name (e.g. `digits`).")
    name: UploadName
    kind: Literal["image", "tabular", "signal", "segmentation", "text"] = Field(
        description="`image` (uint8 C×H×W), `tabular` (F features), `signal` (float32 C×L 1-D signals) or "
        "`segmentation` (uint8 C×H×W images with an H×W mask of class indices each)."
    )
    shape: list[int] = Field(
        description="Per-sample shape: [C, H, W] for images and segmentation, [F] for tabular data, [C, L] for signals."
    )
    num_classes: int = Field(description="Number of classes; labels are 0..num_classes-1.")
    summary: dict[str, Any] | None = Field(
        None,
        description="What the upload's conversion did, when there is something to say. `text`: `tokens` (how "
        "texts became tokens), `pad_id`, `vocab_size`, `max_length` (the cut), `stored_length` (the longest kept "
        "text; shape [L]), `truncated_texts` (texts cut at `max_length`), `longest_text_bytes`, `mean_tokens`, "
        "`text_column`, `label_column`.",
    )
    class_names: list[str] = Field(description="Class name for each label index.")
    num_samples: int = Field(description="Samples in the training split as uploaded.")
    split_sizes: dict[str, int] = Field(description="Samples per split uploaded: `train`, and `val`/`test` if given.")
    sha256: str = Field(description="SHA-256 of the canonical stored `.npz`.")
    size_bytes: int = Field(description="Size of the canonical stored `.npz` in bytes.")
    builtin: bool = Field(description="True for datasets that ship with NormBench.")
    created_at: UtcTimestamp = Field(description="When the dataset was stored.")


class DatasetList(BaseModel):
    items: list[DatasetOut] = Field(description="Datasets visible to the caller, newest first.")
