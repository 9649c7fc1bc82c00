"""Novelty risk: how far an input's internal representation lies from what the model saw in training.

The signature is learned on the features that enter the model's output layer (averaged over any sequence or
spatial dims): running statistics standardise them, and a small autoencoder with a saturating bottleneck learns to
reconstruct them. The risk of a sample is its reconstruction error: low where the autoencoder was trained, growing
as the features move away from the training distribution.

Training: add ``risk.mean()`` to the loss. The features are detached, so the risk term trains only capsa's
parameters, never the user's; the running statistics update in training mode like BatchNorm's.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from capsa import _wrapper
from capsa._layers import fresh_copies
from capsa._members import Task
from capsa._wrapper import OutputLayerModel, _CallState, feature_dim

__all__ = ["NeoModel", "Wrapper"]


class NeoModel(OutputLayerModel):
    """A model wrapped by `capsa.neo.Wrapper`."""

    wrapper: Wrapper
    group = "novelty"

    def _new_state(self, module: nn.Module) -> dict[str, Tensor]:
        features = module.weight.shape[1] if isinstance(module, nn.Linear) else module.in_channels
        latent = self.wrapper.latent_dim
        like = {"dtype": module.weight.dtype, "device": module.weight.device}
        encoder = fresh_copies(nn.Linear(features, latent, **like), 1)
        decoder = fresh_copies(nn.Linear(latent, features, **like), 1)
        frozen = {"requires_grad": False}
        return {
            "mean": nn.Parameter(torch.zeros(features, **like), **frozen),
            "var": nn.Parameter(torch.ones(features, **like), **frozen),
            "steps": nn.Parameter(torch.zeros((), **like), **frozen),
            "encoder_weight": encoder["weight"][0],
            "encoder_bias": encoder["bias"][0],
            "decoder_weight": decoder["weight"][0],
            "decoder_bias": decoder["bias"][0],
        }

    def _site_hook(self, name: str, module: nn.Module, args: tuple[Any, ...], output: Tensor) -> None:
        x = args[0].detach()
        self._require_batch_first(name, x, self._state.batch)
        dim = feature_dim(module) % x.dim()
        pooled = [d for d in range(1, x.dim()) if d != dim]
        features = x.mean(dim=pooled) if pooled else x
        p = self.site_state(name)
        if self.training:
            with torch.no_grad():
                var, mean = torch.var_mean(features, dim=0, correction=0)
                weight = torch.clamp(1.0 / (p["steps"] + 1.0), min=self.wrapper.momentum)
                p["mean"].lerp_(mean, weight)
                p["var"].lerp_(var, weight)
                p["steps"].add_(1.0)
        z = (features - p["mean"]) * torch.rsqrt(p["var"] + 1e-5)
        code = torch.tanh(F.linear(z, p["encoder_weight"], p["encoder_bias"]))
        reconstruction = F.linear(code, p["decoder_weight"], p["decoder_bias"])
        self._state.extra["novelty"] = (z - reconstruction).square().mean(dim=-1)

    def _finish(self, out: Tensor, state: _CallState) -> tuple[Tensor, Tensor]:
        novelty = state.extra["novelty"]
        risk = novelty.reshape(-1, *([1] * (out.dim() - 1))).expand(out.shape).contiguous()
        return out, risk


class Wrapper(_wrapper.Wrapper):
    """Novelty risk: reconstruction error of the output layer's input features under a learned signature.

    Args:
        latent_dim: width of the autoencoder's bottleneck (default 8).
        momentum: weight of each training batch in the running feature statistics, after a cumulative warm-up
            (default 0.01).
        task: ``"regression"`` or ``"classification"``; the risk is the same per-sample novelty either way, and
            the prediction is the model's own.
    """

    name = "neo"
    wrapped_class = NeoModel

    latent_dim: int = Field(8, ge=1)
    momentum: float = Field(0.01, gt=0.0, le=1.0)
    task: Task = "regression"
