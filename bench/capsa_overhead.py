"""Cost of risk: wrapped-with-risk forward time / plain forward time, per wrapper, measured in one run.

    python bench/capsa_overhead.py [--device cpu|cuda] [--threads N] [--classifier-only]

Batch 64, eval mode, under `torch.inference_mode()`. Models: an MLP 64-256-256-1 and a small CNN (two conv-BN-ReLU
blocks and a Linear head on 1x28x28 images), under each wrapper and the composed stacks. For scale it also times
the two ways of running 8 full copies of the model: a Python loop and `torch.func.vmap` over stacked copies.
Last, a 10-class MLP classifier at batch 1000, where the reduction over the members' probabilities dominates if
it is not cheap (vote(5) should stay within 2x the plain forward); for that reduction it also counts, with
`torch.profiler`, the kernels it launches (CUDA) or the aten ops it calls (CPU), against `torch.std_mean`.
"""

from __future__ import annotations

import argparse
import copy

import torch
from torch import nn
from torch.utils.benchmark import Timer

from capsa import neo, sample, sculpt, vote

COMPOSED = {
    "vote(sculpt) (8)": lambda: vote.Wrapper(n_voters=8, inner=sculpt.Wrapper()),
    "sample(sculpt) (8)": lambda: sample.Wrapper(n_samples=8, inner=sculpt.Wrapper()),
    "neo(vote(sculpt)) (8)": lambda: neo.Wrapper(inner=vote.Wrapper(n_voters=8, inner=sculpt.Wrapper())),
}


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 1))


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        nn.Flatten(), nn.Linear(16, 10),
    )


def seconds(fn, x: torch.Tensor, device: str) -> float:
    def run() -> None:
        fn(x)
        if device == "cuda":
            torch.cuda.synchronize()

    with torch.inference_mode():
        for _ in range(20):
            run()
        return Timer("run()", globals={"run": run}).blocked_autorange(min_run_time=1.0).median


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--classifier-only", action="store_true", help="only the 10-class case")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    print(f"device={device} torch={torch.__version__} threads={torch.get_num_threads()} batch=64")
    if args.classifier_only:
        classifier(device)
        return
    wrappers = {
        "sculpt": lambda: sculpt.Wrapper(),
        "vote (8 voters)": lambda: vote.Wrapper(n_voters=8),
        "sample (8 passes)": lambda: sample.Wrapper(n_samples=8),
        "sample, all hidden": lambda: sample.Wrapper(n_samples=8, noise_layers=99),
        "neo": lambda: neo.Wrapper(),
        **COMPOSED,
    }
    for name, factory, shape in [("MLP 64-256-256-1", mlp, (64,)), ("small CNN", cnn, (1, 28, 28))]:
        torch.manual_seed(0)
        model = factory().to(device).eval()
        x = torch.randn(64, *shape, device=device)
        base = seconds(model, x, device)
        print(f"\n{name}: plain forward {base * 1e6:.0f} us")
        for label, make in wrappers.items():
            wrapped = make()(copy.deepcopy(model)).to(device).eval()
            with torch.inference_mode():
                wrapped(x)
            t = seconds(lambda v, w=wrapped: w(v, return_risk=True), x, device)
            print(f"  {label:<22} {t / base:5.2f}x  ({t * 1e6:.0f} us)")
        loop, full = full_copies(model, x, device)
        print(f"  {'8 copies, loop':<22} {loop / base:5.2f}x   {'8 copies, vmap':<16} {full / base:5.2f}x")
    classifier(device)


def classifier(device: str) -> None:
    """10-class MLP at batch 1000: the members' probability reduction must not dominate."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    model = model.to(device).eval()
    x = torch.randn(1000, 64, device=device)
    base = seconds(model, x, device)
    print(f"\n10-class MLP classifier, batch 1000: plain forward {base * 1e6:.0f} us")
    for label, make in {
        "vote (5 voters)": lambda: vote.Wrapper(n_voters=5, task="classification"),
        "sample (8 passes)": lambda: sample.Wrapper(n_samples=8, task="classification"),
        "neo(vote) (5)": lambda: neo.Wrapper(inner=vote.Wrapper(n_voters=5, task="classification")),
    }.items():
        wrapped = make()(copy.deepcopy(model)).to(device).eval()
        with torch.inference_mode():
            wrapped(x)
        t = seconds(lambda v, w=wrapped: w(v, return_risk=True), x, device)
        print(f"  {label:<22} {t / base:5.2f}x  ({t * 1e6:.0f} us)")
    members = torch.randn(5, 1000, 10, device=device)
    old = seconds(lambda v: torch.std_mean(v.softmax(-1), dim=0), members, device)
    from capsa._members import reduce_members

    new = seconds(lambda v: reduce_members(v, "classification", -1), members, device)
    print(f"  reduction of [5, 1000, 10]: torch.std_mean {old * 1e6:.0f} us, capsa {new * 1e6:.0f} us")
    unit = "CUDA kernels" if device == "cuda" else "aten ops"
    for task in ("classification", "regression"):
        count = kernels(lambda v, t=task: reduce_members(v, t, -1), members, device)
        print(f"  {task} reduction: {count} {unit} (torch.std_mean: {kernels(torch.std_mean, members, device)})")


def kernels(fn, x: torch.Tensor, device: str) -> int:
    """Kernels `fn(x)` launches on CUDA, or top-level aten ops it calls on CPU (each at least one kernel)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with torch.inference_mode():
        fn(x)
        with profile(activities=activities) as prof:
            fn(x)
            if device == "cuda":
                torch.cuda.synchronize()
    events = prof.events()
    if device == "cuda":
        return sum(1 for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    return sum(1 for e in events if e.cpu_parent is None and e.name.startswith("aten::"))


def full_copies(model: nn.Module, x: torch.Tensor, device: str) -> tuple[float, float]:
    """Seconds for 8 full copies of `model`: a Python loop, and torch.func.vmap over stacked copies."""
    copies = [copy.deepcopy(model) for _ in range(8)]
    loop = seconds(lambda v: torch.stack([c(v) for c in copies]).std(0), x, device)
    params, buffers = torch.func.stack_module_state(copies)
    shell = copy.deepcopy(model).to("meta")

    def one(p: dict, b: dict, v: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(shell, (p, b), (v,))

    full = seconds(lambda v: torch.func.vmap(one, in_dims=(0, 0, None))(params, buffers, v).std(0), x, device)
    return loop, full

if __name__ == "__main__":
    main()
