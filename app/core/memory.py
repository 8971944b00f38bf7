"""Torch-free estimate of a job's peak memory on one worker, from the catalogue's description of each network,
so the API refuses at submit what cannot fit on a worker and says which batch size (or MLP width) would.

What a worker holds while it trains a pack of K runs of one batch size B:

    baseline                 the process itself (interpreter, torch, Celery)            WORKER_BASELINE_BYTES
    dataset                  training + validation split resident, 2× the stored arrays while loading
    K × state                parameters, gradients (and their flat copy), SGD momentum, a spare copy:
                             STATE_BYTES_PER_PARAM bytes per parameter, plus norm buffers
    max(K × B × train/sample, activations saved for the backward pass and the transient gradients of one
        K × chunk × eval/sample) layer, or the forward-only evaluation chunk (workers.packing.EVAL_BATCH)

The per-sample activation figures count each layer's output elements per sample (`Net.site_elements`, exact from
the architecture) times a per-norm factor measured on the real models (tests/test_admission.py checks the
estimate is an upper bound of torch's measured peak and within ACTIVATION_BOUND_FACTOR of it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from app.core import catalogue
from app.core.dataset_format import TEXT_VOCAB
from app.core.units import human_bytes

FLOAT_BYTES = 4
# The worker process at rest (VmData with workers.tasks and torch imported: about 0.25 GiB), with room to spare.
WORKER_BASELINE_BYTES = 768 * 2**20
# Per parameter: the parameter, its gradient, the gradients' flat copy, SGD momentum and one spare copy (the
# models built before stacking, a checkpoint's state) — 5 float32 values.
STATE_BYTES_PER_PARAM = 5 * FLOAT_BYTES
# Evaluation forwards this many validation samples at once over a pack's models, at least MIN_EVAL_CHUNK per model
# (workers.packing.EVAL_BATCH).
EVAL_BATCH = 1024
MIN_EVAL_CHUNK = 128
# The estimate of activations is at most this many times torch's measured peak (tests/test_admission.py).
ACTIVATION_BOUND_FACTOR = 4.0

# Learned parameters per channel of each norm layer (weight and bias; frn and evonorm_s0 add τ or v).
NORM_PARAMS_PER_CHANNEL: dict[str, int] = {
    "bn": 2,
    "gn": 2,
    "ln": 2,
    "rmsnorm": 1,
    "in": 2,
    "none": 0,
    "bn_precise": 2,
    "brn": 2,
    "gn_ws": 2,
    "frn": 3,
    "evonorm_s0": 3,
    "switchable": 2,
    "bgn": 2,
    "ln_channel": 2,
    "bn_frozen": 0,  # its affine is fixed: buffers
    "bn_eval": 2,
}
# Norms that keep buffers without depending on the batch (fine-tuning's): float32 values per channel, int64 step
# counts per layer.
FIXED_STAT_BUFFERS: dict[str, tuple[int, int]] = {"bn_eval": (2, 1), "bn_frozen": (4, 0)}
# Learned parameters per norm layer whatever its width: Switchable Normalization's two sets of 3 mixing weights.
NORM_PARAMS_PER_LAYER: dict[str, int] = {"switchable": 6}
# Float32 tensors per norm site's output (elements per sample) kept for the backward pass, with the
# transients of its own backward: measured per norm on the real layers (the norms written in Python keep
# their intermediates), rounded up.
NORM_ACTIVATION_FACTOR: dict[str, float] = {
    "bn": 4,
    "gn": 4,
    "ln": 4,
    "rmsnorm": 5,
    "in": 4,
    "none": 2,
    "bn_precise": 4,
    "brn": 6,
    "gn_ws": 4,
    "frn": 6,
    "evonorm_s0": 7,
    "switchable": 9,
    "bgn": 5,
    "ln_channel": 5,
    "bn_frozen": 3,
    "bn_eval": 5,
}
# Weight-sized float32 tensors weight standardization keeps per forward (mean-centred, scaled, gradients).
WS_COPIES = 6
WS_EVAL_COPIES = 2


@dataclass(frozen=True)
class Net:
    """What memory a network needs, per the catalogue: its conv/linear weights, its norm sites' channels, and
    the activation elements per sample of each norm site's output and of everything else (input, shortcut
    convolutions, pooled features, logits)."""

    weights: int
    norm_channels: int
    norm_layers: int
    site_elements: tuple[int, ...]
    other_elements: int

    def parameters(self, norm: str) -> int:
        """Learned parameters with `norm` at every site: equals `sum(p.numel() for p in model.parameters())`."""
        per_layer = NORM_PARAMS_PER_LAYER.get(norm, 0) * self.norm_layers
        return self.weights + NORM_PARAMS_PER_CHANNEL[norm] * self.norm_channels + per_layer

    def buffer_bytes(self, norm: str) -> int:
        # Batch-dependent norms keep running mean and variance per channel, and an int64 step count per layer.
        if norm in FIXED_STAT_BUFFERS:
            per_channel, per_layer = FIXED_STAT_BUFFERS[norm]
            return per_channel * FLOAT_BYTES * self.norm_channels + 8 * per_layer * self.norm_layers
        if not catalogue.NORMS[norm].batch_dependent:
            return 0
        return 2 * FLOAT_BYTES * self.norm_channels + 8 * self.norm_layers

    def train_bytes_per_sample(self, norm: str) -> int:
        """Activations saved for the backward pass, and the largest layer's transient gradients, per sample."""
        sites = sum(self.site_elements)
        transient = 2 * max(self.site_elements, default=0)
        return FLOAT_BYTES * math.ceil(NORM_ACTIVATION_FACTOR[norm] * sites + transient + 2 * self.other_elements)

    def fixed_train_bytes(self, norm: str) -> int:
        """Per run, whatever the batch: weight standardization (gn_ws) keeps a few weight-sized intermediates."""
        return WS_COPIES * FLOAT_BYTES * self.weights if catalogue.NORMS[norm].standardize_weights else 0

    def fixed_eval_bytes(self, norm: str) -> int:
        """Per run, forward only: the standardized weights (gn_ws) and their statistics."""
        return WS_EVAL_COPIES * FLOAT_BYTES * self.weights if catalogue.NORMS[norm].standardize_weights else 0

    def eval_bytes_per_sample(self, norm: str) -> int:
        """Forward only: the largest layer's output with the norm's intermediates, and the input, per sample."""
        largest = max(self.site_elements, default=0)
        factor = max(NORM_ACTIVATION_FACTOR[norm], 3)  # a conv's input and output, and the norm's
        return FLOAT_BYTES * math.ceil(factor * largest + 2 * self.other_elements)


def _conv_out(size: int, stride: int) -> int:
    # conv3x3, padding 1: ceil(size / stride)
    return (size - 1) // stride + 1


def network(
    arch: str,
    input_shape: tuple[int, ...] | list[int],
    num_classes: int,
    *,
    depth: int = 20,
    width: int = 16,
    hidden: list[int] | None = None,
    levels: int = catalogue.UNET_LEVELS,
    layers: int = 2,
    heads: int = 4,
) -> Net:
    """The memory description of `arch` (as `models.nets.build_model` builds it) for inputs of `input_shape`."""
    shape = tuple(input_shape)
    head_bias = num_classes
    info = catalogue.ARCHS.get(arch)
    if info is not None and info.torchvision:
        return _torchvision_network(info, shape, num_classes)
    if arch == "unet":
        return _unet(shape, num_classes, width=width, levels=levels)
    if arch == "transformer":
        return _transformer(shape, num_classes, width=width, layers=layers, heads=heads)
    sites = catalogue.norm_sites(arch, depth=depth, width=width, hidden=hidden)
    channels = sum(s.channels for s in sites)
    if arch == "mlp":
        weights, prev = 0, math.prod(shape)
        for s in sites:
            weights += prev * s.channels + s.channels  # Linear with bias
            prev = s.channels
        weights += prev * num_classes + head_bias
        elements = tuple(s.channels for s in sites)
        return Net(weights, channels, len(sites), elements, math.prod(shape) + 2 * num_classes)
    if arch in ("cnn1d", "resnet1d"):
        return _network_1d(arch, shape, num_classes, depth=depth, width=width)
    if len(shape) != 3:
        raise catalogue.CatalogueError(f"architecture '{arch}' needs (C, H, W) image inputs; got shape {shape}")
    c, h, w = shape
    if arch == "cnn":
        weights, prev, elems = 0, c, []
        for i, cw in enumerate(catalogue.stage_widths(width)):
            stride = 1 if i == 0 else 2
            h, w = _conv_out(h, stride), _conv_out(w, stride)
            weights += prev * cw * 9
            elems.append(cw * h * w)
            prev = cw
        weights += prev * num_classes + head_bias
        return Net(weights, channels, len(sites), tuple(elems), c * shape[1] * shape[2] + prev + 2 * num_classes)
    if arch == "resnet":
        n = catalogue.resnet_blocks_per_stage(depth)
        weights = c * width * 9  # stem
        elems = [width * h * w]
        other = c * h * w
        prev = width
        for i, cw in enumerate(catalogue.stage_widths(width)):
            for b in range(n):
                stride = 2 if i > 0 and b == 0 else 1
                h, w = _conv_out(h, stride), _conv_out(w, stride)
                weights += prev * cw * 9 + cw * cw * 9
                if stride != 1 or prev != cw:
                    weights += prev * cw  # 1×1 projection shortcut, no bias
                    other += cw * h * w
                other += cw * h * w  # the residual sum (the ReLU after it is in place)
                elems += [cw * h * w, cw * h * w]
                prev = cw
        weights += prev * num_classes + head_bias
        return Net(weights, channels, len(sites), tuple(elems), other + prev + 2 * num_classes)
    raise catalogue.unknown_choice("architecture", arch, sorted(catalogue.ARCHS))


def _unet(shape: tuple[int, ...], num_classes: int, *, width: int, levels: int) -> Net:
    """models.unet.UNet: double 3×3 convs per level (ceil-mode pooling), decoders on the concatenated skip, a 1×1
    head; besides the norm sites it keeps the input, each level's pooled and upsampled/concatenated maps and the
    per-pixel logits with their softmax."""
    if len(shape) != 3:
        raise catalogue.CatalogueError(f"architecture 'unet' needs (C, H, W) image inputs; got shape {shape}")
    c, h, w = shape
    widths = catalogue.unet_widths(width, levels)
    sides = [(math.ceil(h / 2**i), math.ceil(w / 2**i)) for i in range(levels + 1)]
    weights, prev, elems, other = 0, c, [], c * h * w
    for cw, (hh, ww) in zip(widths, sides, strict=True):
        weights += prev * cw * 9 + cw * cw * 9
        elems += [cw * hh * ww] * 2
        other += prev * hh * ww  # the pooled input of the level
        prev = cw
    for i in reversed(range(levels)):
        cat = widths[i + 1] + widths[i]
        hh, ww = sides[i]
        weights += cat * widths[i] * 9 + widths[i] * widths[i] * 9
        elems += [widths[i] * hh * ww] * 2
        other += 2 * cat * hh * ww  # upsampled map and the concatenation
    weights += widths[0] * num_classes + num_classes
    sites = catalogue.norm_sites("unet", width=width, levels=levels)
    channels = sum(s.channels for s in sites)
    return Net(weights, channels, len(sites), tuple(elems), other + 3 * num_classes * h * w)


def _network_1d(arch: str, shape: tuple[int, ...], num_classes: int, *, depth: int, width: int) -> Net:
    """`cnn1d` and `resnet1d` (models.nets.SIGNAL): the 2-D layouts over (C, L) with width-KERNEL_1D kernels."""
    if len(shape) != 2:
        raise catalogue.CatalogueError(f"architecture '{arch}' needs (C, L) signal inputs; got shape {shape}")
    c, length = shape
    k = catalogue.KERNEL_1D
    sites = catalogue.norm_sites(arch, depth=depth, width=width)
    channels = sum(s.channels for s in sites)
    if arch == "cnn1d":
        weights, prev, elems = 0, c, []
        for i, cw in enumerate(catalogue.stage_widths(width)):
            length = _conv_out(length, 1 if i == 0 else 2)
            weights += prev * cw * k
            elems.append(cw * length)
            prev = cw
        weights += prev * num_classes + num_classes
        return Net(weights, channels, len(sites), tuple(elems), c * shape[1] + prev + 2 * num_classes)
    n = catalogue.resnet_blocks_per_stage(depth)
    weights, elems, other, prev = c * width * k, [width * length], c * length, width
    for i, cw in enumerate(catalogue.stage_widths(width)):
        for b in range(n):
            stride = 2 if i > 0 and b == 0 else 1
            length = _conv_out(length, stride)
            weights += prev * cw * k + cw * cw * k
            if stride != 1 or prev != cw:
                weights += prev * cw  # 1-wide projection shortcut, no bias
                other += cw * length
            other += cw * length  # the residual sum
            elems += [cw * length, cw * length]
            prev = cw
    weights += prev * num_classes + num_classes
    return Net(weights, channels, len(sites), tuple(elems), other + prev + 2 * num_classes)


def _transformer(shape: tuple[int, ...], num_classes: int, *, width: int, layers: int, heads: int) -> Net:
    """`transformer` (models.transformer) over (L,) tokens: exact weights; activations per block of the attention
    (q, k, v, scores and softmax per head, the weighted sum), the 4×width MLP (before and after GELU) and the
    residual sums, rounded up."""
    if len(shape) != 1:
        raise catalogue.CatalogueError(f"architecture 'transformer' needs (L,) token inputs; got shape {shape}")
    (length,) = shape
    d = width
    sites = catalogue.norm_sites("transformer", width=d, layers=layers, heads=heads)
    per_block = 3 * d * d + 3 * d + d * d + d + 4 * d * d + 4 * d + 4 * d * d + d  # qkv, out, MLP
    weights = (TEXT_VOCAB + length) * d + layers * per_block + d * num_classes + num_classes
    elems = tuple(length * s.channels for s in sites)
    per_layer = length * (3 * d + d + 2 * 4 * d + 2 * d) + 3 * heads * length * length
    other = layers * per_layer + 2 * length * d + length + d + 2 * num_classes
    return Net(weights, sum(s.channels for s in sites), len(sites), elems, other)


def _torchvision_network(info: catalogue.ArchInfo, shape: tuple[int, ...], num_classes: int) -> Net:
    """A torchvision network (`shape`: the input as fed to it) from the catalogue's description: exact weights,
    norm sites with their spatial positions, and the activations outside the norms per `other_per_site`."""
    sites = catalogue.norm_sites(info.name, input_shape=shape)
    out, k = info.stem
    weights = info.backbone_weights + (shape[0] - 3) * out * k * k + (info.head_features + 1) * num_classes
    elems = tuple(s.channels * (s.positions or 1) for s in sites)
    other = math.prod(shape) + info.other_per_site * sum(elems) + info.head_features + 2 * num_classes
    return Net(weights, sum(s.channels for s in sites), len(sites), elems, other)


@dataclass(frozen=True)
class JobShape:
    """What of a job decides its memory: the network, the norms it compares, the pack and the data."""

    net: Net
    norms: tuple[str, ...]
    pack: int  # runs trained together
    batch_size: int  # the largest of the job's
    val_size: int
    dataset_bytes: int  # the stored arrays, every split


@dataclass(frozen=True)
class Estimate:
    """One worker's peak memory for a job, by part, in bytes."""

    baseline: int
    dataset: int
    state: int  # the pack's parameters, gradients, momentum and buffers
    activations: int  # the pack's, at the larger of training and evaluation
    parameters: int  # of one run's network (the largest variant)

    @property
    def total(self) -> int:
        return self.baseline + self.dataset + self.state + self.activations


def resident_dataset_bytes(dataset_bytes: int) -> int:
    """Loading reads every split and copies the training and validation rows: at most twice the stored arrays."""
    return 2 * dataset_bytes


def estimate(job: JobShape) -> Estimate:
    """The peak memory of one worker training `job`'s largest-batch pack (its worst norm)."""
    net, k = job.net, job.pack
    params = max(net.parameters(n) for n in job.norms)
    state = k * max(STATE_BYTES_PER_PARAM * net.parameters(n) + net.buffer_bytes(n) for n in job.norms)
    train = k * max(job.batch_size * net.train_bytes_per_sample(n) + net.fixed_train_bytes(n) for n in job.norms)
    chunk = min(max(MIN_EVAL_CHUNK, EVAL_BATCH // k), max(job.val_size, 1))
    evaluation = k * max(chunk * net.eval_bytes_per_sample(n) + net.fixed_eval_bytes(n) for n in job.norms)
    return Estimate(
        WORKER_BASELINE_BYTES, resident_dataset_bytes(job.dataset_bytes), state, max(train, evaluation), params
    )


def largest_batch(job: JobShape, limit: int) -> int:
    """The largest batch size (0: none) at which `job` fits in `limit` bytes."""
    lo, hi = 0, job.batch_size
    while lo < hi:  # the estimate grows with the batch size
        mid = (lo + hi + 1) // 2
        if estimate(replace(job, batch_size=mid)).total <= limit:
            lo = mid
        else:
            hi = mid - 1
    return lo


def largest_hidden(job: JobShape, hidden: list[int], limit: int, build: MlpBuilder) -> int:
    """The widest uniform MLP hidden width (0: none) at which `job` fits in `limit` at its batch size."""
    lo, hi = 0, max(hidden)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if estimate(replace(job, net=build([mid] * len(hidden)))).total <= limit:
            lo = mid
        else:
            hi = mid - 1
    return lo


class MlpBuilder:
    """The MLP's `Net` for other hidden widths, the rest of the job unchanged."""

    def __init__(self, input_shape: tuple[int, ...] | list[int], num_classes: int) -> None:
        self.input_shape, self.num_classes = tuple(input_shape), num_classes

    def __call__(self, hidden: list[int]) -> Net:
        return network("mlp", self.input_shape, self.num_classes, hidden=hidden)


def dataset_bytes(kind: str, shape: list[int] | tuple[int, ...], split_sizes: dict[str, int | None]) -> int:
    """The stored arrays of a dataset: uint8 images or float32 features, and int64 labels, every split."""
    samples = sum(int(v) for v in split_sizes.values() if isinstance(v, int))
    if kind == "segmentation":  # uint8 images and uint8 masks (one byte per pixel)
        return samples * (math.prod(shape) + math.prod(shape[1:]))
    item = 1 if kind == "image" else FLOAT_BYTES  # text: uint16 stored, int32 on the worker
    return samples * (math.prod(shape) * item + 8)


def check_fits(job: JobShape, limit: int, *, mlp: MlpBuilder | None = None, hidden: list[int] | None = None) -> None:
    """Raise CatalogueError, saying what would fit, when the network is over the catalogue's size bound or the
    job's estimate is over `limit` bytes (a worker's memory)."""
    need = estimate(job)
    if need.parameters > catalogue.MAX_PARAMETERS:
        raise catalogue.CatalogueError(
            f"the network has {need.parameters:,} parameters, more than the limit of {catalogue.MAX_PARAMETERS:,}: "
            "lower model.width, model.depth or model.hidden (the classifier head has one weight per input "
            "feature and class)"
        )
    if need.total <= limit:
        return
    parts = (
        f"parameters, gradients and momentum {human_bytes(need.state)}, activations {human_bytes(need.activations)}, "
        f"dataset {human_bytes(need.dataset)}, the worker itself {human_bytes(need.baseline)}"
    )
    runs = f"{job.pack} runs trained together" if job.pack > 1 else "one run"
    message = (
        f"the job needs about {human_bytes(need.total)} on a worker ({runs} at batch size {job.batch_size}: {parts}); "
        f"workers have {human_bytes(limit)} (NORMBENCH_WORKER_MEMORY_BYTES)."
    )
    batch = largest_batch(job, limit)
    message += (
        f" The largest batch size that fits is {batch}." if batch else " No batch size fits this network and dataset."
    )
    if mlp is not None and hidden:
        width = largest_hidden(job, hidden, limit, mlp)
        if width:
            message += f" At batch size {job.batch_size}, MLP hidden widths up to {width} fit."
    raise catalogue.CatalogueError(message)
