"""Epistemic risk from voters: several versions of the model's output layer on a shared trunk.

Voters are the model's own output layer plus ``n_voters - 1`` freshly initialised copies of it (capsa's
parameters); everything before the output layer is shared, so eight voters cost little more than one forward.
The prediction is the voters' mean and the risk their standard deviation (in probability space for classifiers).

How voters stay diverse: in training mode every sample is answered by one voter drawn at random (a new draw every
call), so the user's unchanged loss trains each voter on its own random share of the data, as in bagging, and each
keeps the part of its independent initialisation that the training data never constrain. On inputs like the
training data the voters agree; on inputs whose features leave what the training data explored, they disagree.
At inference all voters run as one batched computation.

Composed: ``vote(sculpt(model))`` gives every voter its own scale head (``n_voters - 1`` copies of sculpt's head
next to the voters' output layers), so the mixture's aleatoric risk is the root mean of the voters' variances and
``Risk.total`` the mixture's predictive standard deviation. In training each sample's prediction and aleatoric
risk come from its one random voter, so ``gaussian_nll_loss(y, target, risk.aleatoric**2)`` trains every voter's
mean and scale heads on its own share of the data. ``neo(vote(model))`` adds novelty. Vote does not stack with
sample (both give epistemic risk).
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field
from torch import Tensor, nn

from capsa import _wrapper
from capsa._layers import apply_stacked, fresh_copies
from capsa._members import Task, reduce_members
from capsa._risk import Risk
from capsa._wrapper import OutputLayerModel, _CallState
from capsa.sculpt import SculptModel

__all__ = ["VoteConfig", "VoteModel", "Wrapper"]


class VoteModel(OutputLayerModel):
    """A model wrapped by `capsa.vote.Wrapper`."""

    wrapper: VoteConfig
    group = "voters"

    @property
    def _sculpt(self) -> SculptModel | None:
        """The sculpt model this vote wraps (its scale head gets one copy per voter), or None."""
        return self.model if isinstance(self.model, SculptModel) else None

    def _new_state(self, module: nn.Module) -> dict[str, Tensor]:
        state = fresh_copies(module, self.wrapper.n_voters - 1)
        if self._sculpt is not None:
            heads = [self._sculpt._new_state(module) for _ in range(self.wrapper.n_voters - 1)]
            state.update({f"scale_{k}": torch.stack([h[k] for h in heads]) for k in heads[0]})
        return state

    def _site_hook(
        self, name: str, module: nn.Module, args: tuple[Any, ...], output: Tensor, state: _CallState
    ) -> Tensor:
        x = args[0]
        self._require_batch_first(name, x, state.batch)
        params = self.site_params(name)
        others = apply_stacked(module, x, {k: params[k] for k in ("weight", "bias") if k in params})
        voters = torch.cat([output.unsqueeze(0), others])
        sculpt = self._sculpt
        if sculpt is not None:  # sculpt's hook ran first (it was built first) and holds voter 0's scale
            inner = sculpt._active_state()
            if inner is None:
                raise RuntimeError("capsa.vote: the inner sculpt layer ran outside its wrapped forward")
            heads = {k[len("scale_") :]: v for k, v in params.items() if k.startswith("scale_")}
            scales = sculpt.scale_from(apply_stacked(module, x, heads))
            base = inner.extra["scale"]
            inner.extra["scale"] = torch.cat([base.unsqueeze(0), scales]).reshape(-1, *base.shape[1:])
        return voters.reshape(-1, *output.shape[1:])

    def _finish(self, out: Tensor, inner: Risk | None, state: _CallState) -> tuple[Tensor, Risk]:
        n, batch = self.wrapper.n_voters, state.batch
        if out.shape[0] != n * batch:
            raise ValueError(
                f"capsa.vote: the model's output has leading dim {out.shape[0]}, expected voters x batch = "
                f"{n} x {batch}; what follows the output layer must keep the batch dimension first"
            )
        voters = out.reshape(n, batch, *out.shape[1:])
        scales = None
        if inner is not None and inner.aleatoric is not None:
            scales = inner.aleatoric.reshape(voters.shape)
        pick = torch.randint(n, (batch,), device=out.device) if self.training else None
        return reduce_members(voters, self.wrapper.task, self.wrapper.class_dim, scales, pick)


class VoteConfig(_wrapper.Wrapper):
    """Epistemic risk from `n_voters` voters that share the model up to its output layer.

    Args:
        n_voters: number of voters, at least 2 (default 5).
        task: ``"regression"`` (risk in output units) or ``"classification"`` (the model returns logits; risk is
            the spread of class probabilities and the prediction the log of the mean probability).
        class_dim: dimension of the classes in the model's output, for classification (default -1).
    """

    name = "vote"
    wrapped_class = VoteModel
    risk_kind = "epistemic"

    n_voters: int = Field(5, ge=2)
    task: Task = "regression"
    class_dim: int = -1


#: The config's name in capsa-torch and in earlier capsa versions.
Wrapper = VoteConfig
