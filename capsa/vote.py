"""Epistemic risk from voters: several versions of the model's output layer on a shared trunk.

Voters are the model's own output layer plus ``n_voters - 1`` freshly initialised copies of it (capsa's
parameters); everything before the output layer is shared, so eight voters cost little more than one forward.
The prediction is the voters' mean and the risk their standard deviation (in probability space for classifiers).

How voters stay diverse: in training mode every sample is answered by one voter drawn at random (a new draw every
call), so the user's unchanged loss trains each voter on its own random share of the data, as in bagging, and each
keeps the part of its independent initialisation that the training data never constrain. On inputs like the
training data the voters agree; on inputs whose features leave what the training data explored, they disagree.
At inference all voters run as one batched computation.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field
from torch import Tensor, nn

from capsa import _wrapper
from capsa._layers import apply_stacked, fresh_copies
from capsa._members import Task, reduce_members
from capsa._wrapper import OutputLayerModel, _CallState

__all__ = ["VoteModel", "Wrapper"]


class VoteModel(OutputLayerModel):
    """A model wrapped by `capsa.vote.Wrapper`."""

    wrapper: Wrapper
    group = "voters"

    def _new_state(self, module: nn.Module) -> dict[str, Tensor]:
        return fresh_copies(module, self.wrapper.n_voters - 1)

    def _site_hook(self, name: str, module: nn.Module, args: tuple[Any, ...], output: Tensor) -> Tensor:
        x = args[0]
        self._require_batch_first(name, x, self._state.batch)
        others = apply_stacked(module, x, self.site_params(name))
        voters = torch.cat([output.unsqueeze(0), others])
        return voters.reshape(-1, *output.shape[1:])

    def _finish(self, out: Tensor, state: _CallState) -> tuple[Tensor, Tensor]:
        n, batch = self.wrapper.n_voters, state.batch
        if out.shape[0] != n * batch:
            raise ValueError(
                f"capsa.vote: the model's output has leading dim {out.shape[0]}, expected voters x batch = "
                f"{n} x {batch}; what follows the output layer must keep the batch dimension first"
            )
        voters = out.reshape(n, batch, *out.shape[1:])
        prediction, risk = reduce_members(voters, self.wrapper.task, self.wrapper.class_dim)
        if self.training:
            pick = torch.randint(n, (batch,), device=out.device)
            prediction = voters[pick, torch.arange(batch, device=out.device)]
        return prediction, risk


class Wrapper(_wrapper.Wrapper):
    """Epistemic risk from `n_voters` voters that share the model up to its output layer.

    Args:
        n_voters: number of voters, at least 2 (default 5).
        task: ``"regression"`` (risk in output units) or ``"classification"`` (the model returns logits; risk is
            the spread of class probabilities and the prediction the log of the mean probability).
        class_dim: dimension of the classes in the model's output, for classification (default -1).
    """

    name = "vote"
    wrapped_class = VoteModel

    n_voters: int = Field(5, ge=2)
    task: Task = "regression"
    class_dim: int = -1
