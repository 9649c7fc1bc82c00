"""`capsa.risk_score` for classifiers keeps its order where probabilities saturate in float32.

A far-out input's runner-up classes have probabilities like ``exp(-1000)``: their spread across members underflows
to 0 in float32 (so the old score, the mean spread, tied every such input at 0), while its log does not.
"""

from __future__ import annotations

import math

import mpmath
import numpy as np
import pytest
import torch
from torch import nn

import capsa
from capsa import neo, sample, vote
from capsa._members import reduce_members

GAPS = [120.0, 150.0, 200.0, 400.0, 800.0, 1600.0, 3200.0]  # logit gap of the top class over the others
WIGGLE = [0.0, 0.7, 1.3, 2.9, 4.1]  # the members disagree a little (one value per member)


def saturated_logits() -> torch.Tensor:
    """Members' logits ``[5, len(GAPS), 3]``: class 0 leads by GAPS (+ each member's wiggle), classes 1, 2 trail."""
    logits = torch.zeros(len(WIGGLE), len(GAPS), 3)
    logits[..., 0] = torch.tensor(GAPS)[None, :] + torch.tensor(WIGGLE)[:, None]
    logits[..., 2] = -0.5
    return logits


def exact_log_spread(logits: torch.Tensor) -> list[float]:
    """``ln`` of the mean over classes of the members' probability standard deviation, in 1,500-digit arithmetic
    (no underflow, and ``1 - exp(-3200)`` still differs from 1)."""
    mpmath.mp.dps = 1500
    members, batch, classes = logits.shape
    out = []
    for b in range(batch):
        spreads = []
        for c in range(classes):
            probs = []
            for m in range(members):
                z = [mpmath.mpf(float(v)) for v in logits[m, b]]
                probs.append(mpmath.exp(z[c]) / mpmath.fsum(mpmath.exp(v) for v in z))
            mean = mpmath.fsum(probs) / members
            spreads.append(mpmath.sqrt(mpmath.fsum((p - mean) ** 2 for p in probs) / members))
        out.append(float(mpmath.log(mpmath.fsum(spreads) / classes)))
    return out


def test_saturated_scores_keep_a_strict_order_and_match_exact_arithmetic() -> None:
    logits = saturated_logits()
    assert (logits.softmax(-1)[..., 1:] == 0).all()  # the runner-ups' probabilities underflow in float32
    _, risk = reduce_members(logits, "classification", -1)
    assert risk.epistemic is not None and risk.log_epistemic is not None
    assert (risk.epistemic.mean(-1) == 0).all()  # the spread itself ties every sample at 0 (the old score)

    score = capsa.risk_score(risk)
    assert score.dtype == torch.float32 and torch.isfinite(score).all() and (score > 0).all()
    assert (score[:-1] > score[1:]).all(), score  # strictly decreasing as the inputs saturate further
    assert torch.isfinite(risk.log_epistemic[:, 1:]).all()  # the runner-ups: their spreads underflow, not their logs
    # score = 1 / (1 + k), k = ln(0.5 / mean spread). A top class whose probability rounds to 1.0 in float32 has
    # no spread left to compute (its true spread is that of the other classes' sum), so k may exceed the exact
    # value by at most ln 2 (the mean spread at most halved), never less; float32 adds ~1e-6 relative.
    k = (1 / score.double() - 1).numpy()
    exact = math.log(0.5) - np.array(exact_log_spread(logits))
    assert (k >= exact - 1e-5 * exact).all() and (k <= exact + math.log(2) + 1e-5 * exact).all(), (k, exact)


def test_unsaturated_scores_are_the_monotone_transform_of_the_mean_spread() -> None:
    """Wherever the spread is representable, the score is ``1 / (1 + ln(0.5 / mean spread))``, whichever way it is
    computed: from the `Risk` (log spread) or from the per-class spread tensor with ``task="classification"``."""
    torch.manual_seed(0)
    logits = torch.randn(6, 40, 10) * 3
    _, risk = reduce_members(logits, "classification", -1)
    from_risk = capsa.risk_score(risk)
    from_tensor = capsa.risk_score(risk.epistemic, task="classification")
    expected = 1 / (1 + torch.log(0.5 / risk.epistemic.double().mean(-1)))
    torch.testing.assert_close(from_risk.double(), expected, rtol=1e-5, atol=0)
    torch.testing.assert_close(from_tensor, from_risk, rtol=1e-5, atol=0)
    assert ((from_risk > 0) & (from_risk <= 1)).all()
    # ranking equals the mean spread's ranking
    assert torch.equal(from_risk.argsort(), risk.epistemic.mean(-1).argsort())
    # a tensor without a task is read as regression: the plain mean, as before
    torch.testing.assert_close(capsa.risk_score(risk.epistemic), risk.epistemic.mean(-1))


def test_members_that_agree_exactly_score_zero_with_finite_gradients() -> None:
    logits = torch.randn(1, 4, 3).expand(5, 4, 3).clone().requires_grad_(True)
    prediction, risk = reduce_members(logits, "classification", -1)
    assert (risk.epistemic == 0).all() and (capsa.risk_score(risk) == 0).all()
    (prediction.sum() + risk.epistemic.sum() + risk.log_epistemic.clamp_min(-50).sum()).backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


def far_out_inputs() -> torch.Tensor:
    """One direction, ever farther from the data: the logits grow linearly, so the gaps reach the thousands."""
    torch.manual_seed(3)
    direction = torch.randn(1, 8)
    return direction * torch.tensor([10.0, 100.0, 1000.0, 10000.0, 100000.0])[:, None]


def agreeing(wrapped: capsa.WrappedModel) -> capsa.WrappedModel:
    """Voters made copies of the output layer plus a little noise, so that far out they agree on the top class
    (fresh random voters disagree there, which is high risk, not saturation); sample's dropout passes agree."""
    torch.manual_seed(2)
    _ = wrapped(torch.randn(2, 8))
    out = wrapped.user_model[-1]
    with torch.no_grad():
        for name, tensor in wrapped.state_dict(keep_vars=True).items():
            if name.startswith("capsa.voters.") and name.endswith(("weight", "bias")):
                layer = out.weight if name.endswith("weight") else out.bias
                tensor.copy_(layer + 0.001 * torch.randn_like(tensor))
    return wrapped.eval()


@pytest.mark.parametrize(
    "make",
    [
        lambda: vote.Wrapper(n_voters=5, task="classification"),
        lambda: sample.Wrapper(n_samples=8, task="classification"),
        lambda: neo.Wrapper(task="classification", inner=vote.Wrapper(n_voters=5, task="classification")),
    ],
    ids=["vote", "sample", "neo(vote)"],
)
def test_wrapped_classifier_ranks_far_out_inputs(make) -> None:
    """Through a wrapped model (the path the server takes: ``predict`` then ``capsa.risk_score``): inputs ever
    farther out saturate ever more, and their scores stay finite, positive and strictly decreasing."""
    torch.manual_seed(3)  # a model whose members all pick the same top class along this direction
    model = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
    wrapped = agreeing(make()(model))
    x = far_out_inputs()
    with torch.no_grad():
        logits, risk = wrapped.predict(x)
        score = capsa.risk_score(risk)
    assert isinstance(risk, capsa.Risk) and risk.task == "classification"
    gaps = logits.max(-1).values - logits.min(-1).values  # log mean probabilities: the members agree
    assert gaps[-1] > 1000, gaps  # saturated far beyond float32's range of probabilities
    assert torch.isfinite(score).all() and (score > 0).all(), score
    assert (score[:-1] > score[1:]).all(), score
    old = risk.epistemic.reshape(len(x), -1).mean(-1)  # the old score: ties at 0 for the far-out inputs
    assert (old[-2:] == 0).all(), old


def test_calibrated_classifier_percentiles_use_the_same_score() -> None:
    """Calibration's risk quantiles and a new sample's percentile go through `capsa.risk_score` on the model's
    `Risk`, so in-process percentiles and served ones (from the served score) agree; an array of classifier risks
    (which cannot carry the log spread) is refused."""
    torch.manual_seed(0)
    model = vote.Wrapper(n_voters=4, task="classification")(
        nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 3))).eval()
    x = torch.randn(400, 5)
    y = torch.randint(0, 3, (400,))
    cal = capsa.calibrate(model, x, y, coverage=0.9)
    probe = torch.cat([torch.randn(20, 5), far_out_inputs()[:, :5]])
    with torch.no_grad():
        _, risk = model.predict(probe)
    from_risk = cal.risk_percentile(risk)
    from_score = cal.risk_percentile(capsa.risk_score(risk).numpy())
    np.testing.assert_array_equal(np.asarray(from_risk), from_score)
    with pytest.raises(capsa.CalibrationError, match=r"classifier's capsa\.Risk or its risk_score"):
        cal.risk_percentile(risk.epistemic.numpy())
    assert ((from_score >= 0) & (from_score <= 1)).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("task", ["classification", "regression"])
def test_cuda_reduction_matches_cpu(task: str) -> None:
    """CUDA takes other kernels (`torch.var_mean`, `torch.log_softmax`): same values, same saturated order."""
    torch.manual_seed(0)
    for members in (saturated_logits(), torch.randn(6, 40, 10) * 3):
        prediction, risk = reduce_members(members, task, -1)
        prediction_c, risk_c = reduce_members(members.cuda(), task, -1)
        torch.testing.assert_close(prediction_c.cpu(), prediction, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(risk_c.epistemic.cpu(), risk.epistemic, rtol=1e-4, atol=1e-30)
        # float32 spacing at the saturated logits' ~3200 is 2.4e-4: one-pass (CUDA) and two-pass (CPU) variances
        # differ at 1e-4 relative for regression there
        torch.testing.assert_close(capsa.risk_score(risk_c).cpu(), capsa.risk_score(risk), rtol=1e-4, atol=0)
