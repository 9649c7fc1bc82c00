"""Risk that means something: out-of-distribution ranking on the cubic toy and on held-out classes of a real dataset."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr
from sklearn.datasets import load_digits
from sklearn.metrics import roc_auc_score
from torch import nn

from capsa import neo, sample, vote

_spec = importlib.util.spec_from_file_location("cubic", Path(__file__).parents[2] / "examples" / "cubic.py")
cubic = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cubic)


def auroc(inside: torch.Tensor, outside: torch.Tensor) -> float:
    labels = np.r_[np.zeros(len(inside)), np.ones(len(outside))]
    return float(roc_auc_score(labels, np.r_[inside.numpy(), outside.numpy()]))


@pytest.fixture(scope="module")
def grid() -> torch.Tensor:
    return torch.linspace(-6, 6, 1201)[:, None]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["vote", "sample", "neo"])
def test_toy_epistemic_risk_flags_out_of_distribution(kind: str, grid: torch.Tensor) -> None:
    model = cubic.train(kind, steps=1500)
    with torch.no_grad():
        _, risk = model(grid, return_risk=True)
    x, r = grid.squeeze(), risk.squeeze()
    assert auroc(r[x.abs() <= 4], r[x.abs() > 4.5]) >= 0.9


@pytest.mark.slow
def test_toy_sculpt_risk_tracks_the_true_noise(grid: torch.Tensor) -> None:
    model = cubic.train("sculpt", steps=1500)
    with torch.no_grad():
        _, risk = model(grid, return_risk=True)
    x, r = grid.squeeze(), risk.squeeze()
    inside = x.abs() <= 4
    assert spearmanr(r[inside].numpy(), cubic.noise_std(x[inside]).numpy()).statistic >= 0.6


#: Training seeds (each also draws its own training set) of the coverage comparison; fixed, averaged over.
COVERAGE_SEEDS = (0, 1, 2, 3)


@pytest.mark.slow
# Twelve trainings of 1,500 steps: about 140 s on a quiet 2-core machine, over the suite's 600 s at load average 8
# (the full suite under load timed out here), so this test gets its own limit.
@pytest.mark.timeout(2400)
def test_toy_composed_total_covers_the_truth_better_than_either_component() -> None:
    """vote(sculpt)'s 90% interval from ``risk.total`` against sculpt alone and vote alone (each trained by its
    recipe, 1,500 steps, on the same four seeds and training sets), on 20,000 fresh draws of the truth on [-6, 6]
    (about 13,300 inside the training range [-4, 4], 6,700 outside), coverage averaged over the seeds.

    Measured (torch 2.13 CPU, one and two threads alike; ranges in README): inside, composed 0.900, sculpt 0.895,
    vote 0.149; outside, composed 0.454, sculpt 0.406, vote 0.092. Sampling error of one coverage here is about 0.003
    inside and 0.006 outside; the seeds vary far more (sculpt alone covers 0.29 to 0.54 outside, by seed).

    - Outside, the claim holds: composed closer to 0.9 than both, by more than 0.02 (twice the pooled sampling
      error, 0.006 / sqrt(4) per mean, with room for the seeds), because its epistemic part adds the voters'
      disagreement to the aleatoric spread there.
    - Inside, composed and sculpt alone are both calibrated (their aleatoric spreads learn the same noise and the
      voters agree on the data: the epistemic part alone covers 0.16), so "closer than sculpt" is a coin toss at
      the 0.01 level (per seed, sculpt was the closer one in 3 of 4). The test asserts the honest form: composed no
      further from 0.9 than sculpt by more than 0.01, and far closer than vote.
    """
    x, y = cubic.make_data(20000, -6.0, 6.0, seed=cubic.HELD_OUT_SEED)
    mean: dict[str, dict[str, float]] = {}
    for kind, spread in (("vote(sculpt)", "total"), ("sculpt", "risk"), ("vote", "risk")):
        runs = [cubic.coverage(cubic.train(kind, steps=1500, seed=s), x, y)[spread] for s in COVERAGE_SEEDS]
        mean[kind] = {region: float(np.mean([r[region] for r in runs])) for region in ("inside", "outside")}
    miss = {kind: {region: abs(c - 0.9) for region, c in cov.items()} for kind, cov in mean.items()}
    composed, sculpt_alone, vote_alone = miss["vote(sculpt)"], miss["sculpt"], miss["vote"]
    assert composed["outside"] < sculpt_alone["outside"] - 0.02, mean
    assert composed["outside"] < vote_alone["outside"] - 0.02, mean
    assert composed["inside"] <= sculpt_alone["inside"] + 0.01, mean
    assert composed["inside"] < vote_alone["inside"] - 0.5, mean


# ------------------------------------------------------------------ classification on real data
def digits_split(held_out: tuple[int, ...]) -> tuple[torch.Tensor, ...]:
    """scikit-learn's digits (shipped with the package): train on the classes not in ``held_out`` (relabelled 0-4),
    hold out a test set of those and every sample of the ``held_out`` classes."""
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target)
    known = torch.tensor(sorted(set(range(10)) - set(held_out)))
    relabel = torch.full((10,), -1, dtype=torch.long)
    relabel[known] = torch.arange(len(known))
    g = torch.Generator().manual_seed(0)
    seen = torch.nonzero(relabel[y] >= 0).squeeze()
    seen = seen[torch.randperm(len(seen), generator=g)]
    train, test = seen[:700], seen[700:]
    unseen = torch.nonzero(relabel[y] < 0).squeeze()
    return x[train], relabel[y[train]], x[test], relabel[y[test]], x[unseen]


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, ...]:
    """Train on 0-4, hold out test 0-4 and unseen 5-9."""
    return digits_split((5, 6, 7, 8, 9))


def classifier() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 5))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("kind", "make"),
    [
        ("vote", lambda: vote.Wrapper(n_voters=8, task="classification")),
        ("sample", lambda: sample.Wrapper(n_samples=16, task="classification")),
        ("neo", lambda: neo.Wrapper(task="classification")),
    ],
)
def test_classifier_ranks_unseen_classes_riskier(kind: str, make, digits) -> None:
    x_train, y_train, x_test, y_test, x_unseen = digits
    torch.manual_seed(0)
    wrapped = make()(classifier())
    _ = wrapped(x_train[:4])
    optimizer = torch.optim.Adam(wrapped.parameters(), lr=2e-3)
    for _ in range(600):
        idx = torch.randint(0, len(x_train), (64,))
        logits, risk = wrapped(x_train[idx], return_risk=True)
        loss = F.cross_entropy(logits, y_train[idx]) + (risk.mean() if kind == "neo" else 0.0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    wrapped.eval()
    with torch.no_grad():
        logits, risk_test = wrapped(x_test, return_risk=True)
        _, risk_unseen = wrapped(x_unseen, return_risk=True)
    accuracy = (logits.argmax(-1) == y_test).float().mean().item()
    assert accuracy >= 0.9, f"{kind}: accuracy {accuracy:.3f} on the seen classes"
    score = auroc(risk_test.sum(-1), risk_unseen.sum(-1))
    assert score >= 0.8, f"{kind}: AUROC {score:.3f}"


@pytest.mark.slow
@pytest.mark.parametrize(
    "held_out", [(5, 6, 7, 8, 9), (0, 1, 2, 3, 4), (1, 3, 5, 7, 9), (0, 2, 4, 6, 8), (0, 3, 4, 7, 8)]
)
def test_neo_novelty_ranking_does_not_depend_on_the_split(held_out: tuple[int, ...]) -> None:
    """neo's AUROC for held-out classes stays >= 0.85 whichever five classes are held out."""
    x_train, y_train, x_test, _, x_unseen = digits_split(held_out)
    torch.manual_seed(0)
    wrapped = neo.Wrapper(task="classification")(classifier())
    _ = wrapped(x_train[:4])
    optimizer = torch.optim.Adam(wrapped.parameters(), lr=2e-3)
    for _ in range(600):
        idx = torch.randint(0, len(x_train), (64,))
        logits, risk = wrapped(x_train[idx], return_risk=True)
        loss = F.cross_entropy(logits, y_train[idx]) + risk.mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    wrapped.eval()
    with torch.no_grad():
        _, risk_test = wrapped(x_test, return_risk=True)
        _, risk_unseen = wrapped(x_unseen, return_risk=True)
    score = auroc(risk_test.sum(-1), risk_unseen.sum(-1))
    assert score >= 0.85, f"held out {held_out}: AUROC {score:.3f}"
