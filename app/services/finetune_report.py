"""Report sections for the practitioner's question: what each variant took from the uploaded weights, and what
each variant × batch size cost (throughput and peak memory), measured on the workers."""

from __future__ import annotations

import math
from html import escape
from typing import Any

from app.core import catalogue
from app.schemas.results import Results

# How a variant's norm trains from pretrained weights: the sentence the report leads its row with.
FINE_TUNING_BEHAVIOUR = {
    "bn": "BatchNorm in train mode: statistics re-estimated from each (small) batch, running averages updated",
    "bn_frozen": "pretrained running statistics and affine kept fixed (torchvision's FrozenBatchNorm2d)",
    "bn_eval": "BatchNorm in eval mode: pretrained running statistics fixed, affine trainable",
    "gn": "GroupNorm: statistics from each sample's channel groups; BatchNorm statistics cannot transfer",
    "ln_channel": "LayerNorm over channels: statistics per sample and position; nothing to transfer",
}
METHOD_LABELS = {
    "cuda_max_memory_allocated": "GPU: torch.cuda.max_memory_allocated over the pack (the dataset on the device "
    "included)",
    "process_peak_rss": "CPU: the worker process's peak resident set during the pack (Linux VmHWM, reset at its "
    "start; the worker itself, its dataset and allocator slack included)",
    "process_lifetime_peak_rss": "CPU: the worker process's peak resident set since it started (the per-pack "
    "reset was not allowed)",
}


def e(value: object) -> str:
    return escape(str(value), quote=True)


def behaviour(norm: str) -> str:
    info = catalogue.NORMS.get(norm)
    return FINE_TUNING_BEHAVIOUR.get(norm) or (info.description if info else norm)


def transfer_section(runs: list[Any]) -> str:
    """Per variant, what its runs' `init` transferred from the upload and what could not (empty without init)."""
    first: dict[str, Any] = {}
    for r in runs:
        init = (r.environment or {}).get("init")
        if init and r.variant not in first:
            first[r.variant] = (r.norm, init)
    if not first:
        return ""
    out = [
        '<section class="card" id="transfer"><h2>What each variant took from the uploaded weights</h2>',
        '<table><thead><tr><th class="l">variant</th><th class="l">how it fine-tunes</th><th class="l">transferred'
        '</th><th class="l">not transferred, and why</th></tr></thead><tbody>',
    ]
    head = ""
    for variant, (norm, init) in first.items():
        moved = ", ".join(init.get("transferred") or []) or "nothing"
        kept_out = "; ".join(init.get("not_transferred") or []) or "—"
        head = init.get("head") or head
        out.append(
            f'<tr><td class="l">{e(variant)}</td><td class="l">{e(behaviour(norm))}</td>'
            f'<td class="l">{e(moved)}</td><td class="l small">{e(kept_out)}</td></tr>'
        )
    upload = next(iter(first.values()))[1].get("upload_norm", "?")
    out.append(
        f'</tbody></table><p class="small">The upload was trained with {e(upload)}. Classifier head: {e(head)}.</p>'
        "</section>"
    )
    return "".join(out)


def _mib(x: float | None) -> str:
    return "—" if x is None or not math.isfinite(x) else f"{x / 2**20:,.0f}"


def resources_section(results: Results) -> str:
    """Images per second and peak memory per variant × batch size (means over succeeded seeds)."""
    if not any(c.images_per_s.n for c in results.cells):
        return ""
    out = [
        '<section class="card" id="resources"><h2>Throughput and peak memory by variant and batch size</h2>',
        '<table><thead><tr><th class="l">variant</th><th>batch</th><th>images/s (mean)</th>'
        "<th>peak memory MiB (mean)</th><th>runs per pack</th></tr></thead><tbody>",
    ]
    packs: dict[tuple[str, int], set[int]] = {}
    methods: set[str] = set()
    for r in results.runs:
        if r.pack_runs is not None:
            packs.setdefault((r.variant, r.batch_size), set()).add(r.pack_runs)
        if r.peak_memory_method:
            methods.add(r.peak_memory_method)
    for c in results.cells:
        ips = c.images_per_s.mean
        shown = "—" if ips is None or not math.isfinite(ips) else f"{ips:,.0f}"
        pack = ", ".join(str(k) for k in sorted(packs.get((c.variant, c.batch_size), set()))) or "—"
        out.append(
            f'<tr><td class="l">{e(c.variant)}</td><td>{c.batch_size}</td><td>{shown}</td>'
            f"<td>{_mib(c.peak_memory_bytes.mean)}</td><td>{pack}</td></tr>"
        )
    how = "; ".join(METHOD_LABELS.get(m, m) for m in sorted(methods)) or "not recorded"
    out.append(
        f'</tbody></table><p class="small">Peak memory: {e(how)}. Runs trained together (a pack) share one device '
        "and one peak, so compare variants at equal runs per pack; images/s is each run's samples over its wall "
        "time. A probe (POST /v1/probes) measures one run of each variant alone.</p></section>"
    )
    return "".join(out)
