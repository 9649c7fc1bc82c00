#!/usr/bin/env bash
# The checks that need a CUDA machine, as one short run (see README "Performance"):
#   capsa's CUDA tests, TF32's effect on batch invariance, wrapper overhead on the GPU and on an idle CPU,
#   and the served path on cuda (bench/serve_gpu_check.py, which ends with the compute-bound CNN case on cuda:0:
#   served images/s against the in-process forward). Without a CUDA device it says so and exits 0.
# Usage, from the repository root on the GPU machine: bash bench/gpu_check.sh
# Wheels missing there (fastapi, pydantic, ...) may be carried in .whl/ (see the device notes in the closing note).
set -u
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
if ! python3 -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "SKIP: no CUDA device here (bench/gpu_check.sh needs a GPU machine)"
    exit 0
fi
nvidia-smi -L; python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))"

echo "== capsa CUDA tests"
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/capsa/test_wrappers.py tests/capsa/test_composition.py -k cuda 2>&1 | tail -4

echo "== batch invariance on CUDA with and without TF32 (max relative difference, alone vs in a batch of 64)"
timeout 120 python3 - <<'PY'
import torch
from capsa import neo, sample, sculpt, vote
from tests.fixtures import archs
wrappers = {"sculpt": sculpt.Wrapper, "sample": sample.Wrapper, "vote": vote.Wrapper, "neo": neo.Wrapper}
for tf32 in (True, False):
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = tf32
    worst = {}
    for fam, (factory, kwargs, shape) in archs.FAMILIES.items():
        for name, w in wrappers.items():
            torch.manual_seed(0)
            m = w()(getattr(archs, factory)(**kwargs)).eval().cuda()
            x = torch.randn(64, *shape, device="cuda")
            with torch.inference_mode():
                yb, rb = m(x, return_risk=True)
                diff = 0.0
                for i in range(0, 64, 7):
                    y, r = m(x[i:i+1], return_risk=True)
                    for a, b in ((y[0], yb[i]), (r[0], rb[i])):
                        diff = max(diff, ((a - b).abs() / b.abs().clamp(min=1)).max().item())
            worst[f"{name}/{fam}"] = diff
    print(f"tf32={tf32}: max {max(worst.values()):.2e}; over 1e-5: {[k for k, v in worst.items() if v > 1e-5]}")
PY

echo "== wrapper overhead on cuda"
timeout 120 python3 bench/capsa_overhead.py --device cuda
echo "== wrapper overhead on an idle CPU (1 thread)"
timeout 120 python3 bench/capsa_overhead.py --device cpu --threads 1

echo "== served path on cuda"
timeout 180 python3 bench/serve_gpu_check.py
