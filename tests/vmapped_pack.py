"""The pack engine's core, checked against each model alone: models stacked as workers.packing stacks them,
run under vmap(functional_call) over a meta-device copy."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

Params = dict[str, torch.Tensor]
Forward = Callable[[Params, Params, torch.Tensor], torch.Tensor]


def assert_pack_equals_each_model(
    models: list[nn.Module], base: nn.Module, x: torch.Tensor, rtol: float, atol: float
) -> tuple[Forward, Params, Params]:
    """Run `models` as one pack on `x` (one batch per model): each output and, after the forward, each buffer
    (running statistics) equals the model's own. Returns the pack's forward, stacked parameters and buffers."""
    params, stacked_buffers = stack_module_state(models)  # type: ignore[arg-type]
    buffers = {k: v.clone() for k, v in stacked_buffers.items()}

    def forward(p: Params, b: Params, xb: torch.Tensor) -> torch.Tensor:
        return functional_call(base, (p, b), (xb,))

    out = vmap(forward)(params, buffers, x)
    for i, model in enumerate(models):
        torch.testing.assert_close(out[i], model(x[i]), rtol=rtol, atol=atol)
        for name, buf in model.named_buffers():
            torch.testing.assert_close(buffers[name][i], buf, msg=name)
    return forward, params, buffers
