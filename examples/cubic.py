"""The classic toy for risk-aware regression: y = x**3 / 10 with noise whose spread grows with |x|.

Trains a small MLP under each capsa wrapper, and under the composed ``vote(sculpt(model))``, on x in [-4, 4],
evaluates on [-6, 6] and writes a plot of prediction and risk against x (training range shaded) to
``examples/cubic.png``. Run: ``python examples/cubic.py``.

The composed model's ``risk.total`` (aleatoric and epistemic together) is its predictive standard deviation: in the
training range it follows the noise, outside it grows with what the voters do not know. The script also prints how
often each model's 90% interval (``prediction +- 1.645 * risk``) covers fresh targets inside and outside the training
range (`coverage`), and the composed panel's title states it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import capsa
from capsa import neo, sample, sculpt, vote

WRAPPERS = {
    "sculpt": lambda: sculpt.Wrapper(distribution=sculpt.Normal),
    "sample": lambda: sample.Wrapper(n_samples=16, distribution=sample.Bernoulli(0.1)),
    "vote": lambda: vote.Wrapper(n_voters=8),
    "neo": lambda: neo.Wrapper(),
    # Composed: every voter gets its own scale head (the spec form of vote.Wrapper()(sculpt.Wrapper()(model))).
    "vote(sculpt)": lambda: vote.Wrapper(n_voters=8, inner=sculpt.Wrapper()),
}


def noise_std(x: torch.Tensor) -> torch.Tensor:
    """The true standard deviation of the target's noise: small near 0, growing with |x|."""
    return 0.1 + 0.25 * x.abs()


def make_data(n: int, low: float, high: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, generator=g) * (high - low) + low
    y = x**3 / 10 + noise_std(x) * torch.randn(n, 1, generator=g)
    return x, y


def mlp(hidden: int = 64) -> nn.Module:
    return nn.Sequential(nn.Linear(1, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1))


#: Fresh draws of the truth on [-6, 6] (held out: another seed than any training set) for `coverage`.
HELD_OUT_SEED = 7


def coverage(
    model: capsa.WrappedModel, x: torch.Tensor, y: torch.Tensor, z: float = 1.645
) -> dict[str, dict[str, float]]:
    """How often ``prediction +- z * spread`` covers the target (z = 1.645: a 90% Gaussian interval), inside the
    training range [-4, 4] and outside it, for each spread the model gives: ``total``, ``aleatoric`` and
    ``epistemic`` for a composed model, ``risk`` for a single wrapper."""
    with torch.no_grad():
        pred, risk = model(x, return_risk=True)
    spreads = {"total": risk.total, **risk.components()} if isinstance(risk, capsa.Risk) else {"risk": risk}
    inside = (x.abs() <= 4).squeeze(-1)
    out = {}
    for name, spread in spreads.items():
        covered = ((y - pred).abs() <= z * spread).squeeze(-1).double()
        out[name] = {"inside": covered[inside].mean().item(), "outside": covered[~inside].mean().item()}
    return out


def train(kind: str, *, steps: int = 3000, seed: int = 0) -> capsa.WrappedModel:
    """Train an MLP wrapped with `kind` following each wrapper's recipe; returns it in eval mode."""
    torch.manual_seed(seed)
    x, y = make_data(2000, -4.0, 4.0, seed)
    wrapped = WRAPPERS[kind]()(mlp())
    _ = wrapped(x[:8])  # creates capsa's parameters, so the optimizer sees them
    optimizer = torch.optim.Adam(wrapped.parameters(), lr=3e-3)
    for _step in range(steps):
        idx = torch.randint(0, len(x), (128,))
        xb, yb = x[idx], y[idx]
        if wrapped.composed:  # the composed recipe: the aleatoric scale in the likelihood, plus any novelty term
            pred, risk = wrapped(xb, return_risk=True)
            loss = F.gaussian_nll_loss(pred, yb, risk.aleatoric**2)
            if risk.novelty is not None:
                loss = loss + risk.novelty.mean()
        elif kind == "sculpt":
            pred, risk = wrapped(xb, return_risk=True)
            loss = F.gaussian_nll_loss(pred, yb, risk**2)
        elif kind == "neo":
            pred, risk = wrapped(xb, return_risk=True)
            loss = F.mse_loss(pred, yb) + risk.mean()
        else:
            loss = F.mse_loss(wrapped(xb), yb)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return wrapped.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_suffix(".png"))
    parser.add_argument("--steps", type=int, default=3000)
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = torch.linspace(-6, 6, 600)[:, None]
    x_train, y_train = make_data(600, -4.0, 4.0, seed=1)
    x_test, y_test = make_data(20000, -6.0, 6.0, seed=HELD_OUT_SEED)
    fig, axes = plt.subplots(2, 3, figsize=(15, 7), sharex=True)
    axes.flat[-1].axis("off")
    for ax, kind in zip(axes.flat, WRAPPERS, strict=False):
        model = train(kind, steps=args.steps)
        covered = coverage(model, x_test, y_test)
        if kind != "neo":  # neo's risk is a novelty score, not a spread
            print(f"{kind:<13} 90% interval coverage (inside / outside [-4, 4]): "
                  + ", ".join(f"{k} {v['inside']:.3f} / {v['outside']:.3f}" for k, v in covered.items()))
        with torch.no_grad():
            pred, risk = model(xs, return_risk=True)
        if isinstance(risk, capsa.Risk):
            risk = risk.total
        x, p, r = xs.squeeze(), pred.squeeze(), risk.squeeze()
        ax.axvspan(-4, 4, color="0.92", label="training range")
        ax.scatter(x_train.squeeze(), y_train.squeeze(), s=2, color="0.6")
        ax.plot(x, (x**3) / 10, "k--", lw=1, label="truth")
        ax.plot(x, p, color="C0", label="prediction")
        if kind != "neo":  # neo's risk is a novelty score, not in the target's units
            ax.fill_between(x, p - 2 * r, p + 2 * r, color="C0", alpha=0.25, label="prediction ± 2 risk")
        twin = ax.twinx()
        twin.plot(x, r, color="C3", lw=1)
        twin.set_ylabel("risk", color="C3")
        title = f"capsa.{kind}"
        if "(" in kind:
            total = covered["total"]
            title += f": risk.total, 90% covers {total['inside']:.2f} in / {total['outside']:.2f} out of range"
        ax.set_title(title, fontsize=10)
        ax.set_ylim(-25, 25)
    axes[0, 0].legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
