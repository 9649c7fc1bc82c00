"""Aleatoric risk: the model learns the spread of the target around its prediction.

A second head, a copy of the model's output layer fed the same features, predicts a scale per output element.
Train it with torch's own loss: ``y, risk = wrapped(x, return_risk=True)``;
``loss = torch.nn.functional.gaussian_nll_loss(y, target, risk**2)``.

Composed, sculpt goes innermost (it gives ``Risk.aleatoric``): ``vote(sculpt(model))`` gives every voter its own
scale head (the voters' copies of the output layer each come with a copy of the scale head), and
``sample(sculpt(model))`` feeds the scale head the noisy passes, so each pass predicts its own scale. The outer
wrapper mixes the members: aleatoric = root mean of the members' variances. Train composed models with
``loss = gaussian_nll_loss(y, target, risk.aleatoric**2)``. Sculpt wraps regression models only.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

import torch.nn.functional as F
from pydantic import Field, field_serializer, field_validator
from torch import Tensor, nn

from capsa import _wrapper
from capsa._layers import apply_layer, fresh_copies
from capsa._risk import Risk
from capsa._wrapper import OutputLayerModel, _CallState

__all__ = ["Normal", "SculptConfig", "SculptModel", "Wrapper"]


class Normal:
    """Gaussian noise around the prediction: the risk is its standard deviation."""

    name: ClassVar[str] = "Normal"


_DISTRIBUTIONS: dict[str, type[Normal]] = {"Normal": Normal}


class SculptModel(OutputLayerModel):
    """A model wrapped by `capsa.sculpt.Wrapper`."""

    wrapper: SculptConfig
    group = "scale"

    def _new_state(self, module: nn.Module) -> dict[str, Tensor]:
        params = {k: v[0] for k, v in fresh_copies(module, 1).items()}
        # Start near a unit scale everywhere: small weights, softplus(bias) = 1.
        params["weight"].mul_(0.1)
        if "bias" in params:
            params["bias"].fill_(math.log(math.e - 1.0))
        return params

    def scale_from(self, raw: Tensor) -> Tensor:
        """The scale (standard deviation) from the scale head's raw output."""
        return F.softplus(raw) + self.wrapper.min_scale

    def _site_hook(
        self, name: str, module: nn.Module, args: tuple[Any, ...], output: Tensor, state: _CallState
    ) -> None:
        state.extra["scale"] = self.scale_from(apply_layer(module, args[0], self.site_params(name)))

    def _finish(self, out: Tensor, inner: Risk | None, state: _CallState) -> tuple[Tensor, Risk]:
        scale = state.extra["scale"]
        if scale.shape != out.shape:
            if scale.numel() != out.numel():
                raise ValueError(
                    f"capsa.sculpt: the model's output {tuple(out.shape)} is not the output of its last layer "
                    f"{self._sites[0]!r} {tuple(scale.shape)}; sculpt needs that layer to produce the prediction"
                )
            scale = scale.reshape(out.shape)
        return out, Risk(aleatoric=scale)


class SculptConfig(_wrapper.Wrapper):
    """Aleatoric risk: a learned scale per output element, trained with `gaussian_nll_loss`.

    Args:
        distribution: the noise model; `capsa.sculpt.Normal` (risk = standard deviation).
        min_scale: lower bound added to the predicted scale, keeping the loss finite (default 1e-6).
        task: only ``"regression"``; classifiers get a `ValueError` (their aleatoric spread is in the logits).
    """

    name = "sculpt"
    wrapped_class = SculptModel
    risk_kind = "aleatoric"

    distribution: Any = Field(Normal)
    min_scale: float = Field(1e-6, ge=0.0)
    task: Literal["regression"] = "regression"

    def __init__(self, distribution: Any = Normal, /, **data: Any) -> None:
        """``sculpt.Wrapper(sculpt.Normal)`` as in capsa-torch: the distribution may come first, positionally."""
        # the pydantic plugin types super().__init__ with the base config's fields, which lack `distribution`
        super().__init__(distribution=data.pop("distribution", distribution), **data)  # type: ignore[call-arg]

    @field_validator("task", mode="before")
    @classmethod
    def _regression_only(cls, value: Any) -> Any:
        if value == "classification":
            raise ValueError("capsa.sculpt supports task='regression' only; use vote, sample or neo for classifiers")
        return value

    @field_validator("distribution", mode="before")
    @classmethod
    def _known_distribution(cls, value: Any) -> type:
        if isinstance(value, str) and value in _DISTRIBUTIONS:
            return _DISTRIBUTIONS[value]
        if isinstance(value, type) and value in _DISTRIBUTIONS.values():
            return value
        raise ValueError(f"capsa.sculpt: unknown distribution {value!r} (known: {', '.join(_DISTRIBUTIONS)})")

    @field_serializer("distribution")
    def _distribution_name(self, value: type[Normal]) -> str:
        return value.name


#: The config's name in capsa-torch and in earlier capsa versions.
Wrapper = SculptConfig
