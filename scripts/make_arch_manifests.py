"""Writes app/core/arch_manifests/<arch>.json: every state-dict key of a torchvision architecture with its shape,
dtype and role, so the torch-free API can check uploaded weights. Run with a Python that has torchvision:

    python scripts/make_arch_manifests.py            # rewrite every manifest
    python scripts/make_arch_manifests.py --check    # exit 1 if a manifest differs from torchvision
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn
from torchvision import models

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "app" / "core" / "arch_manifests"
# The last Linear layer of each network (its ImageNet-1k classifier, as torchvision builds it): the only layer
# whose shape depends on the classes, re-initialised for a dataset's. The layers before it in `classifier`
# (MobileNet's hidden Linear, ConvNeXt's LayerNorm2d) are pretrained backbone and transfer.
HEADS = {
    "resnet18": "fc",
    "resnet50": "fc",
    "mobilenet_v3_small": "classifier.3",
    "convnext_tiny": "classifier.2",
}
NORM_TYPES: tuple[type[nn.Module], ...] = (nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)
DTYPES = {torch.float32: "F32", torch.int64: "I64"}


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, NORM_TYPES) or type(module).__name__ == "LayerNorm2d"


def _role(name: str, module: nn.Module, head: str) -> str:
    """`head` (the classifier), `stat` (a BatchNorm running statistic), `norm` (a norm layer's affine weight
    or bias: it transfers to GroupNorm too), `param` (every other backbone parameter)."""
    if name == head or name.startswith(head + "."):
        return "head"
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return "norm" if name.rsplit(".", 1)[-1] in ("weight", "bias") else "stat"
    if _is_norm(module):
        return "norm"
    return "param"


def manifest(arch: str) -> dict[str, Any]:
    net = getattr(models, arch)(weights=None)  # torchvision's defaults: its own norm layers, 1000 classes
    head = HEADS[arch]
    owners: dict[str, nn.Module] = {}  # state-dict key -> the module that holds the tensor
    for prefix, module in net.named_modules():
        for leaf, _ in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            owners[f"{prefix}.{leaf}" if prefix else leaf] = module
    tensors = {
        key: {"shape": list(value.shape), "dtype": DTYPES[value.dtype], "role": _role(key, owners[key], head)}
        for key, value in net.state_dict().items()
    }
    norms = sorted({type(m).__name__ for m in net.modules() if _is_norm(m)})
    return {
        "arch": arch,
        "source": f"torchvision {torchvision.__version__.split('+')[0]}: models.{arch}(weights=None)",
        "num_classes": 1000,
        "norm_layers": norms,
        "head": [k for k, t in tensors.items() if t["role"] == "head"],
        "parameters": sum(v.numel() for v in net.parameters()),
        "tensors": tensors,
    }


def render(m: dict[str, Any]) -> str:
    """One tensor a line: readable diffs when torchvision changes."""
    lines = ["{"]
    for key in ("arch", "source", "num_classes", "norm_layers", "head", "parameters"):
        lines.append(f"  {json.dumps(key)}: {json.dumps(m[key])},")
    lines.append('  "tensors": {')
    items = list(m["tensors"].items())
    for i, (name, t) in enumerate(items):
        lines.append(f"    {json.dumps(name)}: {json.dumps(t)}{',' if i < len(items) - 1 else ''}")
    lines += ["  }", "}", ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    stale = []
    for arch in HEADS:
        path = OUT / f"{arch}.json"
        text = render(manifest(arch))
        if args.check:
            if not path.exists() or json.loads(path.read_text()) != json.loads(text):
                stale.append(arch)
        else:
            path.write_text(text)
            print(f"wrote {path.relative_to(ROOT)}")
    if stale:
        print(f"out of date with torchvision {torchvision.__version__}: {', '.join(stale)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
