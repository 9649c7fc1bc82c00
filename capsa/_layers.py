"""Running a site layer with substitute parameters, without going through its hooks."""

from __future__ import annotations

import copy
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def layer_params(module: nn.Module) -> dict[str, Tensor]:
    """The layer's own parameters (weight, and bias if it has one)."""
    return {name: p for name, p in module.named_parameters(recurse=False)}


def apply_layer(module: nn.Module, x: Tensor, params: dict[str, Tensor]) -> Tensor:
    """`module(x)` computed with `params` in place of the module's own weight and bias."""
    weight, bias = params["weight"], params.get("bias")
    if isinstance(module, nn.Linear):
        return F.linear(x, weight, bias)
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        fn = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[len(module.kernel_size)]
        padding = cast(tuple[int, ...], module.padding)  # transposed convolutions refuse string paddings
        return fn(x, weight, bias, module.stride, padding, module.output_padding, module.groups, module.dilation)
    if isinstance(module, nn.modules.conv._ConvNd):
        return module._conv_forward(x, weight, bias)
    raise TypeError(f"capsa cannot re-run a layer of type {type(module).__name__}")


def apply_stacked(module: nn.Module, x: Tensor, stacked: dict[str, Tensor]) -> Tensor:
    """Run `module` once per member of `stacked` (parameters with a leading member dim) on the same input.

    Returns `[M, *module(x).shape]`. Linear layers use one batched matmul; others `torch.func.vmap`.
    """
    if isinstance(module, nn.Linear):
        weight = stacked["weight"]
        flat = x.reshape(-1, x.shape[-1])
        members = weight.shape[0]
        if "bias" in stacked:
            out = torch.baddbmm(stacked["bias"].unsqueeze(1), flat.expand(members, *flat.shape), weight.transpose(1, 2))
        else:
            out = torch.bmm(flat.expand(members, *flat.shape), weight.transpose(1, 2))
        return out.reshape(members, *x.shape[:-1], weight.shape[1])
    return torch.func.vmap(lambda p: apply_layer(module, x, p))(stacked)


def fresh_copies(module: nn.Module, n: int) -> dict[str, Tensor]:
    """Parameters of `n` freshly initialised copies of `module`, stacked along a new leading dim."""
    copies = [_reinitialised(module, {k: torch.empty_like(v) for k, v in layer_params(module).items()})
              for _ in range(n)]
    return {k: torch.stack([c[k] for c in copies]) for k in copies[0]}


def _reinitialised(module: nn.Module, params: dict[str, Tensor]) -> dict[str, Tensor]:
    """Initialise `params` the way `module.reset_parameters` would, without touching the module."""
    shadow = copy.copy(module)
    if not isinstance(shadow, (nn.Linear, nn.modules.conv._ConvNd)):
        raise TypeError(f"capsa cannot re-initialise a layer of type {type(module).__name__}")
    shadow._parameters = {k: nn.Parameter(v, requires_grad=False) for k, v in params.items()}
    shadow.reset_parameters()
    return {k: v.detach() for k, v in shadow._parameters.items() if v is not None}
