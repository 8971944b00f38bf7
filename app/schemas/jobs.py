"""The job spec (the contract a user submits) and job resources."""

from __future__ import annotations

from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from app.core.catalogue import NORMS, PARAMS, ParamValue, norms_description, param_description, variant_label
from app.schemas.common import JobId, SubmittedAt, UtcTimestamp


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSpec(Strict):
    arch: Literal[
        "auto",
        "mlp",
        "cnn",
        "resnet",
        "resnet18",
        "resnet50",
        "mobilenet_v3_small",
        "convnext_tiny",
        "cnn1d",
        "resnet1d",
        "unet",
        "transformer",
    ] = Field(
        "auto",
        description="Network: `mlp` (flattened inputs; any dataset), `cnn` (small CNN for tiny images), "
        "`resnet` (CIFAR-style ResNet), or torchvision's ImageNet networks `resnet18`, `resnet50`, "
        "`mobilenet_v3_small`, `convnext_tiny` (built by torchvision with the variant's norm at every norm "
        "layer; `depth`/`width`/`hidden` do not apply; fine-tune them from uploaded weights with `init`), "
        "or for 1-D signals `cnn1d` (small 1-D CNN) and `resnet1d` (1-D ResNet), or for texts `transformer` (small "
        "pre-norm Transformer encoder of `width` channels, `layers` blocks, `heads` heads; norms `ln`, `rmsnorm`, "
        "`gn`, masked `bn`, `none`). "
        "`auto` picks `mlp` for tabular data, `cnn` for images, `cnn1d` for signals and `transformer` for texts.",
    )
    depth: int = Field(20, ge=8, le=110, description="ResNet depth, 6n+2 (8, 14, 20, 32, 44, 56, 110).")
    width: int = Field(16, ge=1, le=256, description="CNN/ResNet first-stage channel count; stages use ×1, ×2, ×4.")
    levels: int = Field(
        3,
        ge=1,
        le=6,
        description="U-Net (`unet`, segmentation) down-sampling levels; its blocks have `width`·2^i channels, "
        "i = 0..levels. `auto` picks `unet` for segmentation datasets.",
    )
    hidden: list[int] = Field(
        [256, 256], min_length=1, max_length=8, description="MLP hidden layer widths (each gets a norm layer)."
    )
    layers: int = Field(2, ge=1, le=12, description="Transformer blocks (each has two norm layers).")
    heads: int = Field(
        4, ge=1, le=16, description="Transformer attention heads; must divide `width` (the channels per token)."
    )

    @field_validator("hidden")
    @classmethod
    def _hidden_bounds(cls, v: list[int]) -> list[int]:
        if any(w < 1 or w > 4096 for w in v):
            raise ValueError("each hidden width must be between 1 and 4096")
        return v


GroupCount = Annotated[int, Field(ge=PARAMS["groups"].low, le=PARAMS["groups"].high)]
GroupSize = Annotated[int, Field(ge=PARAMS["group_size"].low, le=PARAMS["group_size"].high)]
T = TypeVar("T")
Sweep = Annotated[list[T], Field(min_length=1, max_length=16)]


def _param_field(name: str) -> Any:
    """An optional norm parameter with the catalogue's bounds and description."""
    return Field(None, ge=PARAMS[name].low, le=PARAMS[name].high, description=param_description(name))


class VariantSpec(Strict):
    """One normalization variant. Set only the parameters the chosen `norm` takes (each
    parameter names its norms); a parameter left out takes its default."""

    norm: str = Field(max_length=32, description=norms_description())
    groups: GroupCount | Sweep[GroupCount] | None = Field(
        None, description=param_description("groups") + " A list sweeps it: each value becomes its own variant."
    )
    group_size: GroupSize | Sweep[GroupSize] | None = Field(
        None, description=param_description("group_size") + " A list sweeps it: each value becomes its own variant."
    )
    precise_samples: int | None = _param_field("precise_samples")
    r_max: float | None = _param_field("r_max")
    d_max: float | None = _param_field("d_max")
    warmup_steps: int | None = _param_field("warmup_steps")
    ramp_steps: int | None = _param_field("ramp_steps")

    def params(self) -> dict[str, ParamValue | None]:
        """Every catalogue norm parameter, None where unset (call on an expanded variant)."""
        values = {name: getattr(self, name) for name in PARAMS}
        if any(isinstance(v, list) for v in values.values()):
            raise ValueError("expand() a swept variant before reading its parameters")
        return values

    def expand(self) -> list[VariantSpec]:
        """One variant per value of a swept `groups` or `group_size` list."""
        for name in ("groups", "group_size"):
            values = getattr(self, name)
            if isinstance(values, list):
                return [v for value in values for v in self.model_copy(update={name: value}).expand()]
        return [self]

    def key(self) -> str:
        """The variant's label (`catalogue.variant_label`): results group runs by it, so two
        variants of one job must not share it."""
        return variant_label(self.norm, self.params())


class BudgetSpec(Strict):
    epochs: int = Field(
        10, ge=1, le=1000, description="Passes over the training split; every run sees the same samples."
    )


class OptimizerSpec(Strict):
    name: Literal["sgd"] = Field("sgd", description="Optimizer (SGD with momentum).")
    lr: float = Field(0.1, gt=0, le=10, description="Learning rate at `reference_batch_size`.")
    reference_batch_size: int = Field(32, ge=1, le=65536, description="Batch size at which `lr` applies.")
    lr_scaling: Literal["linear", "sqrt", "none"] = Field(
        "linear", description="How the rate scales with batch size B: lr·B/ref, lr·√(B/ref), or unchanged."
    )
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum.")
    weight_decay: float = Field(5e-4, ge=0, le=1, description="L2 weight decay (not applied to norm parameters).")
    warmup_epochs: float = Field(1.0, ge=0, le=100, description="Linear warm-up length in epochs.")
    schedule: Literal["cosine", "constant"] = Field("cosine", description="Rate after warm-up.")


class AugmentSpec(Strict):
    hflip: bool = Field(False, description="Random horizontal flips (images only).")
    crop_padding: int = Field(
        0, ge=0, le=16, description="Random crops after zero padding by this many pixels (images only)."
    )


class InputSpec(Strict):
    """How images reach the network: stored at their own resolution, resized and cropped on the device."""

    resize: int | None = Field(
        None,
        ge=8,
        le=1024,
        description="Resize so the shorter side has this many pixels (bilinear, antialiased; the aspect ratio "
        "kept, as torchvision's Resize(int)), for training and evaluation. Unset: the stored size.",
    )
    crop: int | None = Field(
        None,
        ge=8,
        le=1024,
        description="Square crop of this side after `resize`: the centre at evaluation, and in training too "
        "unless `random_crop`. Unset: no crop.",
    )
    random_crop: bool = Field(
        False,
        description="Training crops at random positions (drawn per seed and epoch, like the data order, so "
        "every variant sees the same crops); needs `crop`. Flips are `augment.hflip`.",
    )

    @model_validator(mode="after")
    def _random_crop_needs_crop(self) -> InputSpec:
        if self.random_crop and self.crop is None:
            raise ValueError("input.random_crop needs input.crop (the side of the square to cut)")
        return self


class InitSpec(Strict):
    """Start from uploaded weights (fine-tuning) instead of a seeded random initialisation."""

    weights_id: str = Field(
        max_length=64,
        description="Weights you uploaded (POST /v1/weights) for the job's `model.arch`. Every run loads them; "
        "the last classifier layer is re-initialised for the dataset's classes (seeded, the same for every variant).",
    )
    backbone_lr_mult: float = Field(
        1.0,
        gt=0,
        le=10,
        description="Learning-rate multiplier for every layer but the re-initialised head (e.g. 0.1 fine-tunes "
        "the pretrained backbone ten times more gently than the new head).",
    )


class JobSpec(Strict):
    dataset_id: str = Field(
        max_length=64, description="Dataset to train on: an uploaded dataset's id or a built-in name (`digits`)."
    )
    name: str | None = Field(None, max_length=200, description="Optional label for the job.")
    model: ModelSpec = Field(default_factory=ModelSpec, description="The network every variant shares.")
    variants: list[VariantSpec] = Field(
        min_length=1, max_length=32, description="Normalization variants to compare; include `bn` as the baseline."
    )
    batch_sizes: Annotated[list[int], Field(min_length=1, max_length=16)] | Literal["auto"] = Field(
        description='Batch sizes to train each variant at, or `"auto"`: the powers of two from 2 up to the largest '
        "batch size that fits every variant on a worker, as measured by a probe (POST /v1/probes; see `probe_id`). "
        "The stored spec lists the resolved sizes."
    )
    probe_id: str | None = Field(
        None,
        max_length=64,
        description="A succeeded probe (POST /v1/probes) of this dataset, network, input and precision that "
        'measured every variant: it resolves `batch_sizes: "auto"` and its measured memory guards admission '
        'instead of the estimate. Unset with `"auto"`: your newest such probe. Recorded in the stored spec.',
    )
    seeds: list[int] = Field([0], min_length=1, max_length=20, description="Seeds; each gives one run per cell.")
    budget: BudgetSpec = Field(default_factory=BudgetSpec, description="Training budget shared by every run.")
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec, description="Optimizer and learning-rate schedule.")
    augment: AugmentSpec = Field(default_factory=AugmentSpec, description="On-the-fly augmentation (images only).")
    input: InputSpec = Field(
        default_factory=InputSpec,
        description="How images are fed: stored at their own resolution (ingest keeps them as uploaded), "
        "resized and cropped on the device (images only).",
    )
    init: InitSpec | None = Field(
        None, description="Fine-tune from uploaded weights; unset: train from a seeded random initialisation."
    )
    validation_fraction: float = Field(
        0.1,
        gt=0,
        le=0.5,
        description="Share of the training split held out for validation when no `val` split was uploaded.",
    )
    log_every_steps: int = Field(
        50, ge=1, le=100000, description="Record the running train loss every this many steps."
    )
    precision: Literal["fp32", "bf16"] = Field(
        "fp32",
        description="Training arithmetic: `fp32`, or `bf16` (bfloat16 autocast of the training forward pass; "
        "faster on GPUs with bf16 units, slightly noisier). Evaluation runs in fp32. Recorded in each run's environment.",
    )
    equivalence_margin: float = Field(
        0.01,
        gt=0,
        le=0.5,
        description="δ, as an accuracy fraction (0.01 = 1 accuracy point): two variants whose true difference is "
        "within ±δ count as equivalent for your purposes. The results call a comparison `equivalent` when the "
        "two one-sided tests show the difference lies inside ±δ, `different` when the paired test shows a "
        "difference, `inconclusive` otherwise (with the seeds needed to detect δ).",
    )
    pack_size: int | None = Field(
        None,
        ge=1,
        le=256,
        description="Runs that train together, stacked, in one worker process: the runs of one batch size and "
        "variant (`bn_precise` trains as `bn`), taken in seed order, this many at a time. Packing speeds up "
        "small-batch training, and a run's last float digits depend on its pack, so the packs are fixed here, "
        "at submit, and a job gives the same numbers however many workers run it. Unset: the server's "
        "NORMBENCH_PACK_SIZE (4 unless configured), recorded in the stored spec. 1 trains every run alone.",
    )

    @field_validator("batch_sizes")
    @classmethod
    def _batch_sizes(cls, v: list[int] | str) -> list[int] | str:
        if isinstance(v, str):
            return v
        if any(b < 1 or b > 4096 for b in v):
            raise ValueError("each batch size must be between 1 and 4096")
        if len(set(v)) != len(v):
            raise ValueError("batch sizes must be distinct")
        return v

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v: list[int]) -> list[int]:
        if any(s < 0 or s >= 2**31 for s in v):
            raise ValueError("seeds must be between 0 and 2^31-1")
        if len(set(v)) != len(v):
            raise ValueError("seeds must be distinct")
        return v

    @model_validator(mode="after")
    def _pretrained_norms_need_init(self) -> JobSpec:
        needy = sorted({v.norm for v in self.variants if v.norm in NORMS and NORMS[v.norm].needs_init})
        if needy and self.init is None:
            raise ValueError(
                f"{', '.join(needy)} keep pretrained BatchNorm statistics: set init.weights_id to weights with them"
            )
        return self

    @model_validator(mode="after")
    def _distinct_variants(self) -> JobSpec:
        keys = [v.key() for v in self.expanded_variants()]
        if len(set(keys)) != len(keys):
            dupes = sorted({k for k in keys if keys.count(k) > 1})
            raise ValueError(f"variants must be distinct; repeated: {', '.join(dupes)}")
        if len(keys) > 32:
            raise ValueError(f"variants expand to {len(keys)} (sweeps included); the limit is 32")
        return self

    def expanded_variants(self) -> list[VariantSpec]:
        """Variants with every `groups`/`group_size` sweep expanded, in spec order."""
        return [v for variant in self.variants for v in variant.expand()]

    def sizes(self) -> list[int]:
        """The batch sizes, once `"auto"` has been resolved (at submit, from a probe)."""
        if isinstance(self.batch_sizes, str):
            raise ValueError('batch_sizes "auto" is resolved from a probe at submit')
        return self.batch_sizes


class ExtendRequest(Strict):
    """More seeds for a job: the same variants, batch sizes, budget and contract."""

    seeds: list[int] | None = Field(
        None, min_length=1, max_length=20, description="Seeds to add; each must be new to the job."
    )
    add_seeds: int | None = Field(
        None, ge=1, le=20, description="How many seeds to add: the smallest non-negative seeds the job lacks."
    )

    @model_validator(mode="after")
    def _one_way(self) -> ExtendRequest:
        if (self.seeds is None) == (self.add_seeds is None):
            raise ValueError("give exactly one of `seeds` (a list of new seeds) and `add_seeds` (how many)")
        return self


class RunCounts(BaseModel):
    queued: int = Field(0, description="Runs waiting for a worker.")
    running: int = Field(0, description="Runs training now.")
    succeeded: int = Field(0, description="Runs that finished their budget.")
    failed: int = Field(0, description="Runs that stopped on an error (see the run's `error`).")
    diverged: int = Field(0, description="Runs whose loss became NaN/inf.")
    cancelled: int = Field(0, description="Runs cancelled before finishing.")


class JobProgress(BaseModel):
    runs_total: int = Field(description="variants × batch sizes × seeds.")
    runs_finished: int = Field(description="Runs in a terminal state.")
    fraction: float = Field(description="Training progress over all runs, 0..1 (by steps done).")
    counts: RunCounts = Field(description="Runs per status.")


class JobOut(BaseModel):
    id: JobId
    name: str | None = Field(description="Label given at submit.")
    dataset_id: str = Field(description="Dataset the job trains on.")
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"] = Field(
        description="Derived from runs: `succeeded` once every run ended with a result (succeeded or diverged), "
        "`failed` if any run failed, `cancelled` if the job was cancelled."
    )
    spec: JobSpec = Field(description="The validated spec as submitted, with defaults filled in.")
    budget: dict[str, int] = Field(description="Resolved fixed budget: epochs, samples_per_epoch, train/val sizes.")
    progress: JobProgress = Field(description="How far the job is.")
    created_at: SubmittedAt
    started_at: UtcTimestamp | None = Field(description="When the first run started.")
    finished_at: UtcTimestamp | None = Field(description="When the last run ended, once all have.")
    links: dict[str, str] = Field(description="URLs of this job's related resources.")


class JobList(BaseModel):
    items: list[JobOut] = Field(description="The caller's jobs, newest first.")
