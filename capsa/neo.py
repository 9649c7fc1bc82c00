"""Novelty risk: how far an input's internal representation lies from what the model saw in training.

The signature is learned on the model's hidden representations: the inputs of every Linear/ConvNd layer after the
first (averaged over any sequence or spatial dims). Running statistics standardise each of them, and a small
autoencoder with a saturating bottleneck learns to reconstruct them together. A sample's risk is its reconstruction
error: low where the autoencoder was trained, growing as the representation leaves the training distribution.

Training: add ``risk.mean()`` to the loss. The representations are detached, so the risk term trains only capsa's
parameters, never the user's; the running statistics update in training mode, like BatchNorm's.

The prediction is the model's own output (a classifier's raw logits), or, composed, the inner stack's.
Composed, neo goes outermost: ``neo(vote(model))``, ``neo(sample(model))``, ``neo(vote(sculpt(model)))``. It reads
the same hidden layers whatever it wraps (inside sample's passes, averaged over the passes) and adds
``Risk.novelty`` to the inner stack's risk; the composed recipe adds ``risk.novelty.mean()`` to the loss.
"""

from __future__ import annotations

from typing import Any, cast

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from capsa import _wrapper
from capsa._layers import fresh_copies
from capsa._members import Task
from capsa._risk import Risk
from capsa._wrapper import LayerCall, WrappedModel, _CallState, feature_dim, find_site_layer, site_key, site_name

__all__ = ["NeoConfig", "NeoModel", "Wrapper"]


class NeoModel(WrappedModel):
    """A model wrapped by `capsa.neo.Wrapper`."""

    wrapper: NeoConfig

    def _select_sites(self, calls: list[LayerCall]) -> list[str]:
        output = self._output_layer(calls)
        once = [c.name for c in calls if self._trace_counts[c.name] == 1]
        hidden = once[1:] if len(once) > 1 else [output.name]
        return hidden

    def _create_state(self, calls: dict[str, LayerCall]) -> None:
        sites = self._select_sites(list(calls.values()))
        self._install({name: _width(self.user_model.get_submodule(name)) for name in sites})

    def _install(self, widths: dict[str, int]) -> None:
        ref = next(iter(self.user_model.get_submodule(next(iter(widths))).parameters()))
        dtype, device = ref.dtype, ref.device
        stats: dict[str, nn.Module] = {}
        for name, width in widths.items():
            stats[site_key(name)] = nn.ParameterDict({
                "mean": nn.Parameter(torch.zeros(width, dtype=dtype, device=device), requires_grad=False),
                "var": nn.Parameter(torch.ones(width, dtype=dtype, device=device), requires_grad=False),
            })
        total = sum(widths.values())
        latent = self.wrapper.latent_dim or max(1, total // 2)
        encoder = fresh_copies(nn.Linear(total, latent, dtype=dtype, device=device), 1)
        decoder = fresh_copies(nn.Linear(latent, total, dtype=dtype, device=device), 1)
        self.capsa.statistics = nn.ModuleDict(stats)
        self.capsa.autoencoder = nn.ParameterDict({
            "steps": nn.Parameter(torch.zeros((), dtype=dtype, device=device), requires_grad=False),
            "encoder_weight": nn.Parameter(encoder["weight"][0]),
            "encoder_bias": nn.Parameter(encoder["bias"][0]),
            "decoder_weight": nn.Parameter(decoder["weight"][0]),
            "decoder_bias": nn.Parameter(decoder["bias"][0]),
        })

    def _create_state_from_checkpoint(self, shapes: dict[str, torch.Size]) -> None:
        widths: dict[str, int] = {}
        for key, shape in shapes.items():
            parts = key.split(".")
            if len(parts) == 3 and parts[0] == "statistics" and parts[2] == "mean":
                widths[site_name(parts[1])] = shape[0]
        if not widths:
            raise RuntimeError(
                f"capsa.neo: the checkpoint's capsa keys {sorted('capsa.' + k for k in shapes)} are not those of "
                "capsa.neo (expected capsa.statistics.<layer>.mean/var and capsa.autoencoder.*)"
            )
        for name in widths:
            find_site_layer(self.user_model, name, "neo")
        self._install(widths)
        expected = {"capsa." + k: list(v.shape) for k, v in self.capsa.state_dict().items()}
        got = {"capsa." + k: list(v) for k, v in shapes.items()}
        if expected != got:
            self.capsa = nn.Module()
            raise RuntimeError(
                f"capsa.neo: the checkpoint's capsa tensors {got} differ from what this wrapper "
                f"({self.wrapper.to_spec()}) builds for these layers: {expected}"
            )

    @property
    def _statistics(self) -> nn.ModuleDict:
        """Running mean/var per site (`capsa.statistics.<site>`), typed for the checker."""
        return cast(nn.ModuleDict, self.capsa.statistics)

    @property
    def _autoencoder(self) -> nn.ParameterDict:
        """The autoencoder's tensors and step count (`capsa.autoencoder`)."""
        return cast(nn.ParameterDict, self.capsa.autoencoder)

    def _check_state(self, calls: dict[str, LayerCall]) -> None:
        sites = self._select_sites(list(calls.values()))
        loaded = [site_name(k) for k in self._statistics]
        if sorted(loaded) != sorted(sites):
            raise RuntimeError(f"capsa.neo: the checkpoint describes layers {loaded}, the model calls {sites}")
        # A checkpoint may list its keys in any order; the signature concatenates layers in call order.
        stats = self._statistics
        self.capsa.statistics = nn.ModuleDict({site_key(n): stats[site_key(n)] for n in sites})

    def _site_hook(
        self, name: str, module: nn.Module, args: tuple[Any, ...], output: Tensor, state: _CallState
    ) -> None:
        x = args[0].detach()
        batch = state.batch
        if x.dim() > 0 and x.shape[0] != batch and batch and x.shape[0] % batch == 0 and self.composed:
            x = x.reshape(x.shape[0] // batch, batch, *x.shape[1:]).mean(dim=0)  # sample's passes, averaged
        self._require_batch_first(name, x, batch)
        dim = feature_dim(module) % x.dim()
        pooled = [d for d in range(1, x.dim()) if d != dim]
        features = x.mean(dim=pooled) if pooled else x
        stats = cast(nn.ParameterDict, self._statistics[site_key(name)])
        if self.training:
            with torch.no_grad():
                var, mean = torch.var_mean(features, dim=0, correction=0)
                weight = torch.clamp(1.0 / (self._autoencoder["steps"] + 1.0), min=self.wrapper.momentum)
                stats["mean"].lerp_(mean, weight)
                stats["var"].lerp_(var, weight)
        state.extra[name] = (features - stats["mean"]) * torch.rsqrt(stats["var"] + 1e-4)

    def _groups(self) -> tuple[str, ...]:
        return ("statistics", "autoencoder")

    def _finish(self, out: Tensor, inner: Risk | None, state: _CallState) -> tuple[Tensor, Risk]:
        ae = self._autoencoder
        if self.training:
            with torch.no_grad():
                ae["steps"].add_(1.0)
        z = torch.cat([state.extra[name] for name in self._sites], dim=-1)
        code = torch.tanh(F.linear(z, ae["encoder_weight"], ae["encoder_bias"]))
        novelty = (z - F.linear(code, ae["decoder_weight"], ae["decoder_bias"])).square().mean(dim=-1)
        risk = novelty.reshape(-1, *([1] * (out.dim() - 1))).expand(out.shape).contiguous()
        if inner is None:
            return out, Risk(novelty=risk, task=self.wrapper.task)
        return out, inner.replace(novelty=risk)


def _width(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return module.weight.shape[1]
    return cast(int, module.in_channels)  # a ConvNd (site selection admits only Linear and ConvNd)


class NeoConfig(_wrapper.Wrapper):
    """Novelty risk: reconstruction error of the model's hidden representations under a learned signature.

    Args:
        latent_dim: width of the autoencoder's bottleneck (default None: half the signature's width; a fixed 16
            made the novelty ranking depend on which classes were held out).
        momentum: weight of each training batch in the running feature statistics, after a cumulative warm-up
            (default 0.01).
        task: ``"regression"`` or ``"classification"``; the risk is the same per-sample novelty either way, and
            the prediction is the model's own.
    """

    name = "neo"
    wrapped_class = NeoModel
    risk_kind = "novelty"

    latent_dim: int | None = Field(None, ge=1)
    momentum: float = Field(0.01, gt=0.0, le=1.0)
    task: Task = "regression"


#: The config's name in capsa-torch and in earlier capsa versions.
Wrapper = NeoConfig
