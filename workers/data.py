"""A job's dataset resident on the training device: uint8 images, float features, float 1-D signals or int32 text
tokens, split once.

No DataLoader: batches are index slices of device tensors, augmented on the device (workers.augment).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from app.core.dataset_format import TEXT_PAD, load_canonical

SPLIT_SEED = 20180322  # one validation split per dataset, the same for every run and seed


@dataclass
class DeviceData:
    kind: str
    x_train: torch.Tensor  # uint8 NCHW, float32 NF or float32 NCL (signals: never augmented), on device
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    mean: torch.Tensor  # per channel (images, signals) or feature (tabular), broadcastable to a batch
    std: torch.Tensor
    input_shape: tuple[int, ...]
    num_classes: int
    # The uploaded test split, when there is one: evaluated once, after training (it picks nothing).
    x_test: torch.Tensor | None = None
    y_test: torch.Tensor | None = None
    # Text: real (non-PAD) tokens of each training sample, on the host, for the tokens a run has seen.
    lengths: np.ndarray | None = None
    _epoch_tokens: dict[tuple[int, int], int] = field(default_factory=dict)

    def tokens_seen(self, seed: int, epochs: int, samples_per_epoch: int) -> int | None:
        """Real tokens in the first `epochs` epochs of seed `seed`'s sample order (None unless text): every run
        of one seed sees the same ones, whatever its variant or batch size. Each epoch is summed once."""
        if self.lengths is None:
            return None
        total = 0
        for epoch in range(epochs):
            if (seed, epoch) not in self._epoch_tokens:
                order = epoch_order(seed, epoch, len(self.lengths), samples_per_epoch).numpy()
                self._epoch_tokens[(seed, epoch)] = int(self.lengths[order].sum())
            total += self._epoch_tokens[(seed, epoch)]
        return total

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """Raw device batch → normalized float32, once per batch; text's token ids pass through untouched."""
        if self.kind == "text":
            return x
        return (x.float() - self.mean) / self.std


def split_indices(num_samples: int, val_size: int) -> tuple[np.ndarray, np.ndarray]:
    perm = np.random.default_rng(SPLIT_SEED).permutation(num_samples)
    return np.sort(perm[val_size:]), np.sort(perm[:val_size])


# The float64 working set of one chunk of the statistics pass.
STATS_CHUNK_BYTES = 8 * 2**20


def channel_stats(x: np.ndarray, *, image: bool) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) standard deviation per channel over samples and positions (images NCHW, signals NCL) or per
    feature (tabular, NF), as float32 shaped to broadcast against a batch. Computed in float64 over chunks of
    samples, combined with Chan et al.'s pairwise update, so the pass needs one chunk (STATS_CHUNK_BYTES) on top of
    `x`: loading a dataset holds at most its stored arrays, their train/validation copies and one chunk, about
    twice its stored size (tests/test_admission.py), never a float copy of the whole dataset."""
    # `image`: per channel over positions, for images (NCHW) and 1-D signals (NCL) alike.
    axes = (0, *range(2, x.ndim)) if image else (0,)
    shape = (1, -1) + (1,) * (x.ndim - 2) if image else (1, -1)
    rows = max(1, STATS_CHUNK_BYTES // (8 * max(1, int(np.prod(x.shape[1:])))))
    count, mean, m2 = 0, np.zeros(x.shape[1]), np.zeros(x.shape[1])
    for start in range(0, len(x), rows):
        chunk = x[start : start + rows].astype(np.float64)
        k = chunk.size // x.shape[1]  # values per channel in this chunk
        c_mean = chunk.mean(axis=axes)
        chunk -= c_mean.reshape(shape)
        np.square(chunk, out=chunk)
        c_m2 = chunk.sum(axis=axes)
        delta, total = c_mean - mean, count + k
        mean += delta * (k / total)
        m2 += c_m2 + delta**2 * (count * k / total)
        count = total
    std = np.sqrt(m2 / (count - 1)) if count > 1 else np.zeros_like(m2)
    return mean.astype(np.float32).reshape(shape), std.astype(np.float32).reshape(shape)


def load_device_data(path: Path, budget: dict[str, int], device: torch.device) -> DeviceData:
    ds = load_canonical(path)
    x, y = ds.x, ds.y
    if ds.x_val is not None and ds.y_val is not None:
        x_tr, y_tr, x_va, y_va = x, y, ds.x_val, ds.y_val
    else:
        tr, va = split_indices(len(x), budget["val_size"])
        x_tr, y_tr, x_va, y_va = x[tr], y[tr], x[va], y[va]
    if len(x_tr) != budget["train_size"]:
        raise ValueError(f"dataset changed since submit: {len(x_tr)} training samples, expected {budget['train_size']}")
    if ds.kind == "text":  # token ids: int32 for the embedding (torch indexes no uint16), never normalized
        x_tr, x_va = x_tr.astype(np.int32), x_va.astype(np.int32)
        ds.x_test = None if ds.x_test is None else ds.x_test.astype(np.int32)
    xt = torch.from_numpy(np.ascontiguousarray(x_tr)).to(device)
    if ds.kind == "text":
        mean_np, std_np = np.zeros((1, 1), np.float32), np.ones((1, 1), np.float32)
    else:
        mean_np, std_np = channel_stats(x_tr, image=ds.kind != "tabular")  # signals: per channel, as images
    mean, std = torch.from_numpy(mean_np).to(device), torch.from_numpy(std_np).to(device)
    std = torch.where(std > 1e-6, std, torch.ones_like(std))  # constant features stay constant
    return DeviceData(
        kind=ds.kind,
        x_train=xt,
        y_train=torch.from_numpy(y_tr).to(device),
        x_val=torch.from_numpy(np.ascontiguousarray(x_va)).to(device),
        y_val=torch.from_numpy(y_va).to(device),
        mean=mean,
        std=std,
        input_shape=tuple(ds.shape),
        num_classes=ds.num_classes,
        x_test=None if ds.x_test is None else torch.from_numpy(np.ascontiguousarray(ds.x_test)).to(device),
        y_test=None if ds.y_test is None else torch.from_numpy(ds.y_test).to(device),
        lengths=(x_tr != TEXT_PAD).sum(axis=1) if ds.kind == "text" else None,
    )


def epoch_order(seed: int, epoch: int, train_size: int, samples_per_epoch: int) -> torch.Tensor:
    """Sample order for one epoch: a function of (seed, epoch) only, so every variant and batch
    size with the same seed sees the same data in the same order."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(train_size, generator=g)[:samples_per_epoch]


Loader = Callable[[Path, dict[str, int], torch.device], DeviceData]


class ResidentData:
    """The one dataset a worker keeps on its device between tasks, as the memory estimate counts it
    (app.core.memory: one dataset, twice its arrays while loading). The runs of a job reuse it; another dataset
    replaces it, and the old one is released before the new one loads, never held beside it."""

    def __init__(self, load: Loader = load_device_data) -> None:
        self._load = load
        self._key: tuple[str, str, str] | None = None
        self._data: DeviceData | None = None

    def get(self, path: Path, sha256: str, budget: dict[str, int], device: torch.device) -> DeviceData:
        key = (sha256, json.dumps(budget, sort_keys=True), str(device))
        if self._data is None or key != self._key:
            self._key, self._data = None, None  # release first: loading peaks at twice the arrays
            self._data, self._key = self._load(path, budget, device), key
        return self._data
