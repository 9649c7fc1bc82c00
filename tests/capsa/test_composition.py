"""Wrapping never breaks the user's model, wrapped models serve many threads, and wrappers compose by nesting."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import capsa
from capsa import neo, sample, sculpt, vote
from tests.fixtures import archs

ROOT = Path(__file__).parents[2]

SINGLE: dict[str, Callable[[], capsa.Wrapper]] = {
    "sculpt": lambda: sculpt.Wrapper(),
    "sample": lambda: sample.Wrapper(n_samples=4),
    "vote": lambda: vote.Wrapper(n_voters=4),
    "neo": lambda: neo.Wrapper(),
}

#: The compositions of the issue, built by nesting (inner first).
STACKS: dict[str, Callable[[nn.Module], capsa.WrappedModel]] = {
    "vote(sculpt)": lambda m: vote.Wrapper(n_voters=4)(sculpt.Wrapper()(m)),
    "sample(sculpt)": lambda m: sample.Wrapper(n_samples=4)(sculpt.Wrapper()(m)),
    "neo(vote)": lambda m: neo.Wrapper()(vote.Wrapper(n_voters=4)(m)),
    "neo(sample)": lambda m: neo.Wrapper()(sample.Wrapper(n_samples=4)(m)),
    "neo(vote(sculpt))": lambda m: neo.Wrapper()(vote.Wrapper(n_voters=4)(sculpt.Wrapper()(m))),
}
#: Which components each stack gives.
COMPONENTS = {
    "vote(sculpt)": {"aleatoric", "epistemic"},
    "sample(sculpt)": {"aleatoric", "epistemic"},
    "neo(vote)": {"epistemic", "novelty"},
    "neo(sample)": {"epistemic", "novelty"},
    "neo(vote(sculpt))": {"aleatoric", "epistemic", "novelty"},
}


def build(family: str, batch: int = 32) -> tuple[nn.Module, torch.Tensor]:
    factory, kwargs, shape = archs.FAMILIES[family]
    torch.manual_seed(0)
    return getattr(archs, factory)(**kwargs), torch.randn(batch, *shape)


def fresh(family: str) -> nn.Module:
    factory, kwargs, _ = archs.FAMILIES[family]
    return getattr(archs, factory)(**kwargs)


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> bool:
    return bool(((a - b).abs() <= tol * torch.clamp(b.abs(), min=1.0)).all())


def objective(y: torch.Tensor, target: torch.Tensor, risk: capsa.Risk) -> torch.Tensor:
    """The composed training recipe: Gaussian NLL with the aleatoric scale (else MSE), plus the novelty term."""
    nll = risk.aleatoric is not None
    loss = F.gaussian_nll_loss(y, target, risk.aleatoric**2) if nll else F.mse_loss(y, target)
    return loss + (risk.novelty.mean() if risk.novelty is not None else 0.0)


@pytest.fixture(params=sorted(archs.FAMILIES))
def family(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(params=sorted(STACKS))
def stack(request: pytest.FixtureRequest) -> str:
    return request.param


# ------------------------------------------------------------------ the user's model stays the user's model
@pytest.mark.parametrize("kind", [*SINGLE, *STACKS])
def test_plain_model_is_untouched_outside_a_wrapped_forward(kind: str, family: str) -> None:
    model, x = build(family)
    model.eval()
    with torch.no_grad():
        before = model(x)
        wrapped = SINGLE[kind]()(model) if kind in SINGLE else STACKS[kind](model)
        wrapped.eval()
        wrapped(x, return_risk=True)
        after = model(x)
        one = model(x[:1])  # a batch size the wrapper never saw
    assert torch.equal(before, after)
    assert torch.equal(one, before[:1]) or close(one, before[:1])

    # Train through the wrapper: the user's model equals a fresh copy loaded with the same weights.
    wrapped.train()
    optimizer = torch.optim.Adam(wrapped.parameters(), lr=1e-2)
    target = torch.randn_like(before)
    for _ in range(3):
        y, risk = wrapped(x, return_risk=True)
        loss = objective(y, target, risk) if isinstance(risk, capsa.Risk) else F.mse_loss(y, target) + risk.mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    copy = fresh(family)
    copy.load_state_dict(model.state_dict())
    copy.eval()
    with torch.no_grad():
        assert torch.equal(model(x), copy(x))
        assert torch.equal(model(x[:3]), copy(x[:3]))


# ------------------------------------------------------------------ threads
@pytest.mark.slow
@pytest.mark.parametrize("kind", [*SINGLE, "neo(vote(sculpt))", "neo(sample)", "sample(sculpt)"])
def test_concurrent_forwards_equal_sequential_ones(kind: str) -> None:
    model, x = build("mlp", batch=64)
    wrapped = (SINGLE[kind]()(model) if kind in SINGLE else STACKS[kind](model)).eval()
    sizes = [1, 2, 5, 7, 16, 33, 64]
    jobs = [(i, x[: sizes[i % len(sizes)]]) for i in range(160)]

    def call(batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        with torch.no_grad():
            y, risk = wrapped(batch, return_risk=True)
        return y, (risk.components() if isinstance(risk, capsa.Risk) else {"risk": risk})

    expected = {n: call(x[:n]) for n in sizes}
    with ThreadPoolExecutor(max_workers=8) as pool:
        futures = [(batch, pool.submit(call, batch)) for _, batch in jobs]
        results = [(batch, future.result(timeout=120)) for batch, future in futures]
    for batch, (y, risks) in results:
        want_y, want_risks = expected[batch.shape[0]]
        assert torch.equal(y, want_y)
        assert risks.keys() == want_risks.keys()
        assert all(torch.equal(risks[k], want_risks[k]) for k in risks)
    # The plain model, called from other threads meanwhile, is untouched too.
    with torch.no_grad():
        plain = model(x)
    with ThreadPoolExecutor(max_workers=4) as pool:
        outs = [f.result(timeout=120) for f in [pool.submit(call, x) for _ in range(8)]
                + [pool.submit(lambda: model(x).detach()) for _ in range(8)]]
    assert all(torch.equal(o, plain) for o in outs if isinstance(o, torch.Tensor))


# ------------------------------------------------------------------ the optimizer warning
@pytest.mark.parametrize("kind", ["sculpt", "vote", "neo", "neo(vote(sculpt))"])
def test_optimizer_built_before_first_call_warns(kind: str) -> None:
    model, x = build("mlp")
    wrapped = SINGLE[kind]()(model) if kind in SINGLE else STACKS[kind](model)
    optimizer = torch.optim.Adam(wrapped.parameters(), lr=1e-2)
    with pytest.warns(UserWarning, match=r"before building the optimizer"):
        wrapped(x)
    assert len(optimizer.param_groups[0]["params"]) < len(list(wrapped.parameters()))

    model, x = build("mlp")
    wrapped = SINGLE[kind]()(model) if kind in SINGLE else STACKS[kind](model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        wrapped(x)  # the recipe: one call first, then the optimizer
        torch.optim.Adam(wrapped.parameters(), lr=1e-2)
        wrapped(x)


def test_sample_alone_creates_no_parameters_and_does_not_warn() -> None:
    model, x = build("mlp")
    wrapped = sample.Wrapper()(model)
    torch.optim.Adam(wrapped.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        wrapped(x)


# ------------------------------------------------------------------ composition
def test_composed_contract(stack: str, family: str) -> None:
    model, x = build(family)
    user_keys = list(model.state_dict())
    wrapped = STACKS[stack](model)
    assert list(wrapped.capsa_parameters()) == []
    _ = wrapped(x[:4])  # creates every wrapper's parameters, once
    created = [id(p) for p in wrapped.capsa_parameters()]
    assert created
    _ = wrapped(x)
    assert [id(p) for p in wrapped.capsa_parameters()] == created
    everything = {id(p) for p in wrapped.parameters()}
    assert set(created) <= everything and {id(p) for p in model.parameters()} <= everything

    # Readable state-dict keys: the user's as the model names them, then capsa's, one group per wrapper.
    keys = list(wrapped.state_dict())
    assert [k for k in keys if not k.startswith("capsa.")] == user_keys
    groups = {k.split(".")[1] for k in keys if k.startswith("capsa.")}
    expected_groups = {"vote": {"voters"}, "sculpt": {"scale"}, "neo": {"statistics", "autoencoder"}, "sample": set()}
    assert groups == set().union(*(expected_groups[n] for n in wrapped.wrapper.stack_names()))

    # One optimizer over everything; a few steps lower the loss.
    wrapped.eval()
    with torch.no_grad():
        target = wrapped(x) + 0.1 * torch.randn_like(wrapped(x))

    def supervised() -> float:
        wrapped.eval()
        with torch.no_grad():
            y, risk = wrapped(x, return_risk=True)
        if risk.aleatoric is not None:
            return F.gaussian_nll_loss(y, target, risk.aleatoric**2).item()
        return F.mse_loss(y, target).item()

    torch.manual_seed(1)
    target = target + torch.randn_like(target)
    start = supervised()
    optimizer = torch.optim.Adam(wrapped.parameters(), lr=3e-3)
    wrapped.train()
    for _ in range(30):
        y, risk = wrapped(x, return_risk=True)
        loss = objective(y, target, risk)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert supervised() < start

    # Named risks: finite, >= 0, shaped like the prediction; total is the mixture's standard deviation.
    wrapped.eval()
    with torch.no_grad():
        y, risk = wrapped(x, return_risk=True)
    assert isinstance(risk, capsa.Risk)
    assert set(risk.components()) == COMPONENTS[stack]
    for value in [*risk.components().values(), risk.total]:
        assert value.shape == y.shape and torch.isfinite(value).all() and (value >= 0).all()
    if risk.aleatoric is not None:
        assert torch.allclose(risk.total, (risk.aleatoric**2 + risk.epistemic**2).sqrt(), atol=1e-6)
    else:
        assert torch.equal(risk.total, risk.epistemic)
    assert risk.epistemic.max() > 0

    # Deterministic and batch-invariant in eval mode.
    with torch.no_grad():
        again_y, again = wrapped(x, return_risk=True)
        assert torch.equal(again_y, y) and all(torch.equal(again.components()[k], v)
                                               for k, v in risk.components().items())
        for i in (0, 13, 31):
            one_y, one = wrapped(x[i : i + 1], return_risk=True)
            assert close(one_y[0], y[i])
            assert all(close(one.components()[k][0], v[i]) for k, v in risk.components().items())

    # Spec round trip, then a state-dict round trip into the rebuilt stack.
    spec = wrapped.wrapper.to_spec()
    assert json.loads(json.dumps(spec)) == spec and "inner" in spec
    rebuilt = capsa.from_spec(spec)(fresh(family))
    assert rebuilt.wrapper.to_spec() == spec
    rebuilt.load_state_dict(wrapped.state_dict())
    rebuilt.eval()
    with torch.no_grad():
        y2, risk2 = rebuilt(x, return_risk=True)
    assert torch.allclose(y2, y, atol=1e-6)
    assert all(torch.allclose(risk2.components()[k], v, atol=1e-6) for k, v in risk.components().items())


def test_spec_nests_and_is_versioned() -> None:
    wrapped = STACKS["neo(vote(sculpt))"](archs.mlp())
    spec = wrapped.wrapper.to_spec()
    assert spec["wrapper"] == "neo" and spec["version"] == 1
    assert spec["inner"]["wrapper"] == "vote" and spec["inner"]["n_voters"] == 4
    assert spec["inner"]["inner"] == {**sculpt.Wrapper().to_spec()}
    assert wrapped.wrapper.describe() == "neo(vote(sculpt(model)))"
    assert capsa.from_spec(spec) == wrapped.wrapper
    with pytest.raises(ValueError, match="unknown wrapper 'bagging'"):
        capsa.from_spec({**spec, "inner": {"wrapper": "bagging", "version": 1}})
    with pytest.raises(TypeError, match="call it on a plain model"):
        capsa.from_spec(spec)(vote.Wrapper()(archs.mlp()))


@pytest.mark.parametrize(
    ("make", "named"),
    [
        (lambda: sculpt.Wrapper()(vote.Wrapper()(archs.mlp())), r"vote\(sculpt\(model\)\)"),
        (lambda: sculpt.Wrapper()(sample.Wrapper()(archs.mlp())), r"sample\(sculpt\(model\)\)"),
        (lambda: vote.Wrapper()(neo.Wrapper()(archs.mlp())), r"neo\(vote\(model\)\)"),
        (lambda: sample.Wrapper()(neo.Wrapper()(archs.mlp())), r"neo\(sample\(model\)\)"),
        (lambda: vote.Wrapper()(sample.Wrapper()(archs.mlp())), "both give epistemic risk"),
        (lambda: neo.Wrapper()(neo.Wrapper()(archs.mlp())), "already wrapped by capsa.neo"),
        (lambda: capsa.from_spec({**sculpt.Wrapper().to_spec(), "inner": vote.Wrapper().to_spec()}),
         r"vote\(sculpt\(model\)\)"),
    ],
)
def test_meaningless_orders_are_refused_at_wrap_time(make, named: str) -> None:
    with pytest.raises((TypeError, ValueError), match=named):
        make()


def test_an_inner_stack_is_wrapped_once() -> None:
    inner = sculpt.Wrapper()(archs.mlp())
    vote.Wrapper()(inner)
    with pytest.raises(TypeError, match="already wrapped"):
        sample.Wrapper()(inner)


def test_single_wrappers_return_a_tensor_and_declare_their_kind() -> None:
    kinds = {"sculpt": "aleatoric", "vote": "epistemic", "sample": "epistemic", "neo": "novelty"}
    _, x = build("mlp")
    for name, make in SINGLE.items():
        wrapper = make()
        assert wrapper.risk_kind == kinds[name]
        _, risk = wrapper(archs.mlp(in_features=8, out_features=2)).eval()(x, return_risk=True)
        assert isinstance(risk, torch.Tensor)


@pytest.mark.parametrize("inner", ["vote", "sample"])
def test_composed_classifier(inner: str) -> None:
    model, x = build("mlp")
    make = {"vote": lambda: vote.Wrapper(n_voters=4, task="classification"),
            "sample": lambda: sample.Wrapper(n_samples=4, task="classification")}[inner]
    wrapped = neo.Wrapper(task="classification")(make()(model)).eval()
    logits, risk = wrapped(x, return_risk=True)
    assert risk.task == "classification" and risk.aleatoric is None
    assert torch.allclose(logits.exp().sum(-1), torch.ones(len(x)), atol=1e-5)  # log of the mean probability
    assert torch.equal(risk.total, risk.epistemic)
    assert (capsa.risk_score(risk) >= 0).all() and capsa.risk_score(risk).shape == (len(x),)


def test_mismatched_composed_checkpoint_names_keys_and_shapes() -> None:
    source = STACKS["neo(vote(sculpt))"](archs.mlp())
    source(torch.randn(2, 8))
    target = neo.Wrapper()(vote.Wrapper(n_voters=3)(sculpt.Wrapper()(archs.mlp())))
    with pytest.raises(RuntimeError, match=r"capsa\.voters\.4\.weight"):
        target.load_state_dict(source.state_dict())
    other = STACKS["neo(vote(sculpt))"](archs.mlp(in_features=6))
    with pytest.raises(RuntimeError, match=r"size mismatch for 0\.weight"):
        other.load_state_dict(source.state_dict())


# ------------------------------------------------------------------ bundles, in a fresh process
_LOAD = """
import sys, torch, capsa
from safetensors.torch import load_file, save_file
wrapped = capsa.load_bundle(sys.argv[1])
x = load_file(sys.argv[2])["x"]
with torch.no_grad():
    y, risk = wrapped(x, return_risk=True)
out = {"prediction": y, "total": risk.total, **risk.components()}
save_file({k: v.clone().contiguous() for k, v in out.items()}, sys.argv[3])
"""


@pytest.mark.slow
def test_composed_bundle_round_trip_in_a_fresh_process(stack: str, family: str, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    factory, kwargs, _ = archs.FAMILIES[family]
    model, x = build(family, batch=8)
    wrapped = STACKS[stack](model)
    wrapped(x)
    optimizer = torch.optim.Adam(wrapped.parameters(), lr=1e-2)
    wrapped.train()
    y, risk = wrapped(x, return_risk=True)
    objective(y, torch.zeros_like(y), risk).backward()
    optimizer.step()  # saved state differs from any fresh initialisation
    path = capsa.save_bundle(wrapped, tmp_path / "bundle", architecture=f"tests.fixtures.archs:{factory}",
                             kwargs=kwargs, example_input=x[:2])
    manifest = json.loads((path / "capsa.json").read_text())
    assert [o["name"] for o in manifest["outputs"]] == ["prediction", "risk"] + [
        f"risk_{k}" for k in ("aleatoric", "epistemic", "novelty") if k in COMPONENTS[stack]]
    save_file({"x": x}, tmp_path / "x.safetensors")
    subprocess.run([sys.executable, "-c", _LOAD, str(path), str(tmp_path / "x.safetensors"),
                    str(tmp_path / "out.safetensors")], cwd=ROOT, check=True, timeout=300)
    got = load_file(tmp_path / "out.safetensors")
    wrapped.eval()
    with torch.no_grad():
        y, risk = wrapped(x, return_risk=True)
    assert torch.equal(got["prediction"], y) and torch.equal(got["total"], risk.total)
    assert all(torch.equal(got[k], v) for k, v in risk.components().items())


# ------------------------------------------------------------------ classifier risk under saturation
def test_saturated_classifier_risk_keeps_its_order() -> None:
    """Probabilities that saturate in float32 (the top class is exactly 1.0) still rank by how far they saturate (the
    spread is computed on probabilities scaled by their largest member, so no square underflows), and the
    prediction is the exact log of the mean probability even where the probability itself underflows to 0."""
    from capsa._members import reduce_members

    gaps = torch.tensor([45.0, 60.0, 75.0])  # runner-up probability about 3e-20, 9e-27, 3e-33
    wiggle = torch.tensor([0.0, 0.5, 1.0, 1.5])  # the members disagree a little
    logits = torch.zeros(4, 3, 2)
    logits[..., 0] = gaps[None, :] + wiggle[:, None]
    assert (logits.softmax(-1)[..., 0] == 1.0).all()  # saturated in float32

    prediction, risk = reduce_members(logits, "classification", -1)
    spread = risk.epistemic[:, 1]
    assert (spread > 0).all() and spread[0] > spread[1] > spread[2]
    score = capsa.risk_score(risk)
    assert (score > 0).all() and score[0] > score[1] > score[2]
    assert torch.isfinite(prediction).all() and (prediction[:, 1] < -40).all()  # exact log mean probability
    expected = torch.logsumexp(logits.double().log_softmax(-1), dim=0) - torch.log(torch.tensor(4.0)).double()
    assert torch.allclose(prediction.double(), expected, rtol=1e-5)

    far = torch.zeros(4, 1, 2)
    far[..., 0] = 120.0 + wiggle[:, None]  # the runner-up's probability underflows to 0 in float32
    assert (far.softmax(-1)[..., 1] == 0).all()
    prediction, _ = reduce_members(far, "classification", -1)
    assert -122.0 < prediction[0, 1].item() < -120.0  # log of the mean probability, not log(tiny) = -87.3


# ------------------------------------------------------------------ CUDA (run where a GPU is present)
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_composed_matches_cpu_and_is_batch_invariant(stack: str, family: str) -> None:
    previous = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False  # see test_wrappers.no_tf32
    try:
        model, x = build(family)
        wrapped = STACKS[stack](model).eval()
        y, risk = wrapped(x, return_risk=True)
        wrapped.to("cuda")
        with torch.inference_mode():
            yc, riskc = wrapped(x.cuda(), return_risk=True)
            assert torch.allclose(yc.cpu(), y, atol=1e-4, rtol=1e-3)
            for k, v in risk.components().items():
                assert torch.allclose(riskc.components()[k].cpu(), v, atol=1e-4, rtol=1e-3), k
            for i in (0, 17, 31):
                one_y, one = wrapped(x[i : i + 1].cuda(), return_risk=True)
                assert close(one_y[0], yc[i]) and all(close(one.components()[k][0], v[i])
                                                      for k, v in riskc.components().items())
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = previous


# ------------------------------------------------------------------ bundles that only work here
def test_save_bundle_warns_about_an_architecture_importable_only_from_here(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "mymodels_h1probe.py").write_text(
        "from torch import nn\n\n\ndef factory():\n"
        "    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("PYTHONPATH", raising=False)
    import mymodels_h1probe

    wrapped = vote.Wrapper()(mymodels_h1probe.factory())
    with pytest.warns(UserWarning, match=r"importable only from .* architecture_file="):
        capsa.save_bundle(wrapped, tmp_path / "b", architecture="mymodels_h1probe:factory",
                          example_input=torch.randn(2, 3))
    from capsa._locality import importable_elsewhere

    assert importable_elsewhere("torch.nn") is True  # installed packages do not warn


def test_capsa_verify_accepts_a_composed_bundle(tmp_path: Path) -> None:
    from capsa.cli import verify_bundle

    model, x = build("mlp", batch=4)
    wrapped = STACKS["neo(vote(sculpt))"](model)
    factory, kwargs, _ = archs.FAMILIES["mlp"]
    path = capsa.save_bundle(wrapped, tmp_path / "b", architecture=f"tests.fixtures.archs:{factory}", kwargs=kwargs,
                             example_input=x)
    report = verify_bundle(path)
    assert report["problems"] == [], report
