"""Epistemic risk from stochastic passes: noise after hidden layers, several passes per prediction.

The wrapper adds multiplicative noise (dropout by default) after the hidden Linear/ConvNd layers the model calls
(by default every one but the first).
Training uses the user's unchanged loss on ``wrapped(x)``: one stochastic pass per sample. Prediction runs
``n_samples`` passes as one batched computation, starting at the first noise site (the deterministic part before it
runs once), and returns their mean as the prediction and their standard deviation as the risk.

In eval mode the passes use ``n_samples`` fixed noise masks drawn once from ``seed`` and shared by all samples, so a
sample's prediction and risk are deterministic and do not depend on the rest of its batch: the passes are a fixed
ensemble of thinned networks.

Composed: ``sample(sculpt(model))`` runs sculpt's scale head on the noisy passes, so each pass predicts its own
scale; the aleatoric risk is the root mean of the passes' variances and ``Risk.total`` the predictive standard
deviation of the passes' mixture. ``neo(sample(model))`` reads the hidden layers averaged over the passes.
Sample does not stack with vote (both give epistemic risk).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from capsa import _wrapper
from capsa._members import Task, reduce_members
from capsa._risk import Risk
from capsa._wrapper import LayerCall, WrappedModel, _CallState, feature_dim, site_key

__all__ = ["Bernoulli", "Gaussian", "SampleConfig", "SampleModel", "Wrapper"]


class Bernoulli(BaseModel):
    """Dropout: each feature is dropped with probability `p` (survivors scaled by 1/(1-p))."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: Literal["bernoulli"] = "bernoulli"
    p: float = Field(0.1, gt=0.0, lt=1.0)

    def __init__(self, p: float = 0.1, **data: Any) -> None:
        super().__init__(p=p, **data)

    def noise(self, shape: tuple[int, ...], *, generator: torch.Generator | None = None) -> Tensor:
        keep = torch.rand(shape, generator=generator) >= self.p
        return keep.float() / (1.0 - self.p)

    def sample(self, shape: tuple[int, ...], like: Tensor) -> Tensor:
        """Fresh noise of `shape` on `like`'s device and dtype (training)."""
        return (torch.rand(shape, device=like.device) >= self.p).to(like.dtype) / (1.0 - self.p)


class Gaussian(BaseModel):
    """Multiplicative Gaussian noise with mean 1 and standard deviation `sigma`."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: Literal["gaussian"] = "gaussian"
    sigma: float = Field(0.1, gt=0.0)

    def __init__(self, sigma: float = 0.1, **data: Any) -> None:
        super().__init__(sigma=sigma, **data)

    def noise(self, shape: tuple[int, ...], *, generator: torch.Generator | None = None) -> Tensor:
        return 1.0 + self.sigma * torch.randn(shape, generator=generator)

    def sample(self, shape: tuple[int, ...], like: Tensor) -> Tensor:
        """Fresh noise of `shape` on `like`'s device and dtype (training)."""
        return 1.0 + self.sigma * torch.randn(shape, device=like.device, dtype=like.dtype)


Distribution = Annotated[Bernoulli | Gaussian, Field(discriminator="name")]


class SampleModel(WrappedModel):
    """A model wrapped by `capsa.sample.Wrapper`."""

    wrapper: SampleConfig

    def _select_sites(self, calls: list[LayerCall]) -> list[str]:
        output = self._output_layer(calls)
        hidden: list[str] = []
        for call in calls:
            if call.name != output.name and call.name not in hidden:
                if self._trace_counts[call.name] != 1:
                    raise ValueError(
                        f"capsa.sample: hidden layer {call.name!r} is called {self._trace_counts[call.name]} times "
                        "per forward; noise sites must be called once"
                    )
                hidden.append(call.name)
        if not hidden:
            raise ValueError(
                f"capsa.sample: {type(self.user_model).__name__} has no hidden Linear/ConvNd layer before its output "
                f"layer {output.name!r} to add noise after"
            )
        if self.wrapper.noise_layers is None:
            return hidden[1:] or hidden
        return hidden[-self.wrapper.noise_layers :]

    def _create_state(self, calls: dict[str, LayerCall]) -> None:
        sites = self._select_sites(list(calls.values()))
        for index, name in enumerate(sites):
            module, call = self.user_model.get_submodule(name), calls[name]
            features = call.output_shape[feature_dim(module)]
            generator = torch.Generator().manual_seed(self.wrapper.seed * 100_003 + index)
            masks = self.wrapper.distribution.noise((self.wrapper.n_samples, features), generator=generator)
            weight = module.get_parameter("weight")
            self.capsa.register_buffer(site_key(name), masks.to(weight.device, weight.dtype), persistent=False)
        self._noise_sites = set(sites)

    def _check_state(self, calls: dict[str, LayerCall]) -> None:
        self._create_state(calls)

    def _settle(self, x: Tensor, args: tuple[Any, ...], kwargs: dict[str, Any], calls: list[LayerCall]) -> None:
        """Choose where the passes fork: as late as possible, but before anything that later rejoins them.

        Forking at the first noise site reuses the most computation, but a tensor computed before it that joins
        later (a skip connection) would still have one copy per sample. So candidates are tried from the first
        noise site back towards the input, on a probe batch of two samples, and the first that runs is kept.
        """
        first = self._sites[0]
        before = [c.name for c in calls[: [c.name for c in calls].index(first)]]
        candidates: list[str | None] = [first]
        candidates += [n for n in reversed(before) if self._trace_counts[n] == 1 and n not in candidates]
        candidates.append(None)  # the model's input
        probe = x if (x.shape[0] > 1 or args or kwargs) else torch.cat([x, x])
        modes = {m: m.training for m in self.user_model.modules()}
        self.user_model.eval()
        failure: Exception | None = None
        try:
            for candidate in candidates:
                self._fork_at = candidate
                extra = self._hook(candidate) if candidate is not None and candidate not in self._sites else None
                try:
                    with torch.no_grad():
                        self._run(probe, args, kwargs, return_risk=True)
                    return
                except (RuntimeError, ValueError) as exc:
                    failure = exc
                    if extra is not None:
                        extra.remove()
                        self._sites.pop()
                        self._handles.pop()
        finally:
            for m, mode in modes.items():
                m.training = mode
        raise ValueError(
            f"capsa.sample: {type(self.user_model).__name__} does not run with its batch replicated for "
            f"{self.wrapper.n_samples} passes, neither from a layer nor from its input: {failure}"
        ) from failure

    def _needs_state(self) -> bool:
        return False

    def _create_state_from_checkpoint(self, shapes: dict[str, torch.Size]) -> None:
        keys = sorted("capsa." + k for k in shapes)
        raise RuntimeError(f"capsa.sample keeps no tensors in its state dict, but the checkpoint has {keys}")

    def _passes(self, state: _CallState) -> int:
        return self.wrapper.n_samples if (state.return_risk or not self.training) else 1

    def _prepare_input(self, x: Tensor, state: _CallState) -> Tensor:
        passes = self._passes(state)
        if self._fork_at is None and passes > 1:
            return x.repeat(passes, *([1] * (x.dim() - 1)))
        return x

    def _site_hook(
        self, name: str, module: nn.Module, args: tuple[Any, ...], output: Tensor, state: _CallState
    ) -> Tensor:
        batch, passes = state.batch, self._passes(state)
        if name == self._fork_at:
            self._require_batch_first(name, output, batch)
            output = output.unsqueeze(0)  # the noise below broadcasts it to every pass, no copy before that
            if name not in self._noise_sites:
                return output.expand(passes, *output.shape[1:]).reshape(passes * batch, *output.shape[2:])
        elif output.dim() == 0 or output.shape[0] != passes * batch:
            raise ValueError(
                f"capsa.sample: layer {name!r} sees leading dim {output.shape[0] if output.dim() else None}, "
                f"expected passes x batch = {passes} x {batch}; the model must keep the batch dimension first"
            )
        else:
            output = output.reshape(passes, batch, *output.shape[1:])
        dim = feature_dim(module) % (output.dim() - 1) + 1  # feature dim in [passes, batch, ...]
        shape = [passes, batch] + [1] * (output.dim() - 2)
        shape[dim] = output.shape[dim]
        if self.training:
            noise = self.wrapper.distribution.sample(tuple(shape), output)
        else:
            shape[1] = 1
            noise = getattr(self.capsa, site_key(name)).view(shape)
        # In place only on this layer's own fresh output when no backward pass can need it.
        in_place = output.shape[0] == passes and not torch.is_grad_enabled()
        output = output.mul_(noise) if in_place else output * noise
        return output.reshape(passes * batch, *output.shape[2:])

    def _finish(self, out: Tensor, inner: Risk | None, state: _CallState) -> tuple[Tensor, Risk]:
        passes = self._passes(state)
        members = out.reshape(passes, state.batch, *out.shape[1:])
        scales = None
        if inner is not None and inner.aleatoric is not None:
            scales = inner.aleatoric.reshape(members.shape)
        if passes == 1:
            aleatoric = None if scales is None else scales[0]
            return members[0], Risk(aleatoric=aleatoric, epistemic=torch.zeros_like(members[0]), task=self.wrapper.task)
        return reduce_members(members, self.wrapper.task, self.wrapper.class_dim, scales)


class SampleConfig(_wrapper.Wrapper):
    """Epistemic risk from `n_samples` stochastic passes with noise after every hidden Linear/ConvNd layer.

    Args:
        n_samples: passes per prediction, at least 2 (default 8).
        distribution: the noise: `Bernoulli(p)` (dropout, default p=0.1) or `Gaussian(sigma)`.
        noise_layers: how many hidden layers, counted back from the output layer, get noise. Default None: every
            hidden layer but the first (the one nearest the input, and for CNNs the costliest to repeat), or the
            only one. The deterministic prefix before the first noise site runs once instead of `n_samples` times.
        seed: seed of the fixed noise masks used in eval mode (default 0).
        task: ``"regression"`` or ``"classification"`` (logits in, risk = spread of class probabilities).
        class_dim: dimension of the classes in the model's output, for classification (default -1).
    """

    name = "sample"
    wrapped_class = SampleModel
    risk_kind = "epistemic"

    n_samples: int = Field(8, ge=2)
    distribution: Distribution = Field(default_factory=Bernoulli)
    noise_layers: int | None = Field(None, ge=1)
    seed: int = Field(0, ge=0)
    task: Task = "regression"
    class_dim: int = -1


#: The config's name in capsa-torch and in earlier capsa versions.
Wrapper = SampleConfig
