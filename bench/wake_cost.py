"""What sleeping between requests costs the next forward: ``python -m bench.wake_cost [--n 2000]``.

Times the benchmark's vote(5) MLP (batch 1, one torch thread, ``inference_mode``, prediction, risk and score as a
worker computes them) back to back, then with a gap of 0.5 ms and of 2 ms between calls, the gap spent either
asleep (``time.sleep``: the process blocks, as a worker waiting for its next batch does) or spinning (as with
``CAPSA_BUSY_POLL_US``). On a machine whose idle cores halt (a VM's vCPUs), the forward after a sleep is slower
than after a spin: cold caches and the wake-up itself. Prints p50 per case (us). The README's "Busy polling"
paragraph quotes this script.
"""

from __future__ import annotations

import argparse
import statistics
import time


def _cases(n: int) -> list[tuple[str, float]]:
    """(label, p50 us) per gap, on one torch thread (torch's thread count is restored after)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _measure(n)
    finally:
        torch.set_num_threads(threads)


def _measure(n: int) -> list[tuple[str, float]]:
    import torch

    import capsa
    from bench import serve_arch
    from bench.models import IN_FEATURES, VOTERS

    torch.manual_seed(0)
    wrapped = capsa.vote.Wrapper(n_voters=VOTERS)(serve_arch.build_mlp(in_features=IN_FEATURES))
    wrapped(torch.randn(4, IN_FEATURES))
    wrapped.eval()
    x = torch.randn(1, IN_FEATURES)

    def forward() -> None:
        with torch.inference_mode():
            _, risk = wrapped.predict(x)
            capsa.risk_score(risk).numpy()

    results = []
    for label, gap, asleep in (("back to back", 0.0, False), ("0.5 ms spinning", 5e-4, False),
                               ("0.5 ms asleep", 5e-4, True), ("2 ms spinning", 2e-3, False),
                               ("2 ms asleep", 2e-3, True)):
        times = []
        for _ in range(n):
            start = time.perf_counter()
            forward()
            times.append(time.perf_counter() - start)
            if asleep:
                time.sleep(gap)
            else:
                end = time.perf_counter() + gap
                while time.perf_counter() < end:
                    pass
        results.append((label, statistics.median(times[n // 10:]) * 1e6))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=2000, help="forwards per case (the first tenth is warm-up)")
    args = parser.parse_args()
    print("vote(5) MLP 64-256-256-1, batch 1, 1 thread: forward + risk + score p50 after a gap of ...")
    for label, p50 in _cases(args.n):
        print(f"  {label:16} {p50:7.1f} us")


if __name__ == "__main__":
    main()
