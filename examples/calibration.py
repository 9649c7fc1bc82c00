"""Raw risk versus calibrated intervals on the cubic toy (see ``examples/cubic.py``).

Trains a vote-wrapped MLP on x in [-4, 4], calibrates it on 2,000 fresh samples from the same range
(`capsa.calibrate`, 90% coverage), then plots, on [-6, 6], the "interval" one gets by reading the raw risk as a
standard deviation (``prediction +- 1.645 * risk``) next to the calibrated interval, with held-out test points and
their measured coverage inside the training range. Writes ``examples/calibration.png``. Run:
``python examples/calibration.py``.
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import torch

import capsa

_spec = importlib.util.spec_from_file_location("cubic", Path(__file__).with_name("cubic.py"))
cubic = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cubic)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_suffix(".png"))
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--kind", default="vote", choices=["vote", "sample", "sculpt"])
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model = cubic.train(args.kind, steps=args.steps)
    x_cal, y_cal = cubic.make_data(2000, -4.0, 4.0, seed=21)
    cal = capsa.calibrate(model, x_cal, y_cal, coverage=0.9)
    x_test, y_test = cubic.make_data(5000, -4.0, 4.0, seed=22)
    xs = torch.linspace(-6, 6, 600)[:, None]
    with torch.no_grad():
        pred, risk = model(xs, return_risk=True)
        pred_test, risk_test = model(x_test, return_risk=True)
    z = 1.645
    raw_cov = float(((y_test - pred_test).abs() <= z * risk_test).double().mean())
    lo_test, hi_test = cal.interval(pred_test, risk_test)
    cal_cov = float(((y_test >= lo_test) & (y_test <= hi_test)).double().mean())
    lower, upper = cal.interval(pred, risk)

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    x, p, r = xs.squeeze(), pred.squeeze(), risk.squeeze()
    panels = [
        (axes[0], p - z * r, p + z * r, f"raw risk as a std: +-1.645 risk (held-out coverage {raw_cov:.2f})"),
        (axes[1], lower.squeeze(), upper.squeeze(), f"calibrated 90% interval (held-out coverage {cal_cov:.2f})"),
    ]
    for ax, lo, hi, title in panels:
        ax.axvspan(-4, 4, color="0.93", label="training range")
        ax.scatter(x_test[:600].squeeze(), y_test[:600].squeeze(), s=3, color="0.5", label="held-out data")
        ax.plot(x, x**3 / 10, "k--", lw=1, label="truth")
        ax.plot(x, p, color="C0", label="prediction")
        ax.fill_between(x, lo, hi, color="C1", alpha=0.35, label="interval")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("x")
        ax.set_ylim(-25, 25)
    axes[0].legend(loc="upper left", fontsize=8)
    fig.suptitle(f"capsa.{args.kind} on the cubic toy: what capsa.calibrate changes", fontsize=11)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}: held-out coverage {raw_cov:.3f} raw, {cal_cov:.3f} calibrated; report {cal.report}")


if __name__ == "__main__":
    main()
