"""Uploaded weights as the API shows them."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from app.schemas.common import UploadName, UtcTimestamp


class WeightsOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str = Field(description="Weights id; a job names it in `init.weights_id`.")
    name: UploadName
    arch: str = Field(description="The torchvision architecture the state dict belongs to (e.g. `resnet18`).")
    sha256: str = Field(description="SHA-256 of the stored safetensors file (as uploaded).")
    size_bytes: int = Field(description="Size of the stored file in bytes; counts against the storage quota.")
    tensor_count: int = Field(description="Entries of the state dict.")
    parameter_count: int = Field(description="Elements of the trainable tensors (running statistics left out).")
    dtypes: list[str] = Field(description="safetensors dtypes in the file (`F32`, `F16`, `BF16`, `F64`, `I64`).")
    has_bn_stats: bool = Field(
        description="The file holds every BatchNorm layer's running mean and variance: `bn_frozen`/`bn_eval` "
        "fine-tuning can start from the pretrained statistics."
    )
    has_gn_weights: bool = Field(
        description="The file holds the norm layers' affine weights but no running statistics, on a network "
        "torchvision builds with BatchNorm: weights trained with GroupNorm (`norm_layer=`), which a `gn` "
        "variant starts from."
    )
    head_classes: int | None = Field(
        description="Classes of the uploaded classifier head (re-initialised for the dataset's classes when "
        "fine-tuning); null when the file leaves the head out."
    )
    created_at: UtcTimestamp = Field(description="When the weights were stored.")


class WeightsList(BaseModel):
    items: list[WeightsOut] = Field(description="The caller's weights, newest first: one page.")
    total: int = Field(description="How many weights the caller has in all.")
    next_offset: int | None = Field(description="`offset` of the next page; null on the last one.")
