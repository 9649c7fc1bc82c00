"""The contract every capsa wrapper honours, on every model family of the issue."""

from __future__ import annotations

import copy
import io
import json
import re
from collections.abc import Iterator

import pytest
import torch
from torch import nn

import capsa
from capsa import neo, sample, sculpt, vote
from tests.fixtures import archs

WRAPPERS = {
    "sculpt": lambda: sculpt.Wrapper(distribution=sculpt.Normal),
    "sample": lambda: sample.Wrapper(n_samples=5, distribution=sample.Bernoulli(0.1)),
    "vote": lambda: vote.Wrapper(n_voters=5),
    "neo": lambda: neo.Wrapper(),
}


def build(family: str) -> tuple[nn.Module, torch.Tensor]:
    factory, kwargs, shape = archs.FAMILIES[family]
    torch.manual_seed(0)
    return getattr(archs, factory)(**kwargs), torch.randn(64, *shape)


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> bool:
    return bool(((a - b).abs() <= tol * torch.clamp(b.abs(), min=1.0)).all())


@pytest.fixture(params=sorted(WRAPPERS))
def kind(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(params=sorted(archs.FAMILIES))
def family(request: pytest.FixtureRequest) -> str:
    return request.param


def test_prediction_and_risk_shapes(kind: str, family: str) -> None:
    model, x = build(family)
    expected = model.eval()(x)
    wrapped = WRAPPERS[kind]()(model)
    wrapped.eval()
    y = wrapped(x)
    y2, risk = wrapped(x, return_risk=True)
    assert y.shape == expected.shape == risk.shape
    assert torch.equal(y, y2)
    assert torch.isfinite(risk).all() and (risk >= 0).all()
    assert risk.max() > 0  # a wrapper that returned zeros would be no wrapper


def test_lazy_parameters_and_split(kind: str) -> None:
    model, x = build("mlp")
    user = list(model.parameters())
    wrapped = WRAPPERS[kind]()(model)
    assert [id(p) for p in wrapped.parameters()] == [id(p) for p in user]
    assert list(wrapped.capsa_parameters()) == []
    if kind == "sample":  # creates no parameters
        _ = wrapped(x)
    else:  # parameters() was called above, before capsa created its own
        with pytest.warns(UserWarning, match="before building the optimizer"):
            _ = wrapped(x)
    everything = {id(p) for p in wrapped.parameters()}
    mine = {id(p) for p in wrapped.capsa_parameters()}
    theirs = {id(p) for p in wrapped.user_parameters()}
    assert theirs == {id(p) for p in user}
    assert mine.isdisjoint(theirs) and mine | theirs == everything
    if kind != "sample":  # sample's noise is not learned, so it adds no parameters
        assert mine


def test_state_dict_keys(kind: str, family: str) -> None:
    model, x = build(family)
    user_keys = list(model.state_dict())
    wrapped = WRAPPERS[kind]()(model)
    _ = wrapped(x)
    keys = list(wrapped.state_dict())
    assert [k for k in keys if not k.startswith("capsa.")] == user_keys
    assert all(k in user_keys or k.startswith("capsa.") for k in keys)


def test_save_then_load_into_fresh_wrapper_before_any_call(kind: str, family: str) -> None:
    model, x = build(family)
    wrapped = WRAPPERS[kind]()(model)
    _ = wrapped(x)
    optimizer = torch.optim.Adam(wrapped.parameters(), lr=1e-2)
    wrapped.train()
    out, risk = wrapped(x, return_risk=True)
    (out.square().mean() + risk.mean()).backward()
    optimizer.step()  # the saved state differs from any fresh initialisation
    buffer = io.BytesIO()
    torch.save(wrapped.state_dict(), buffer)

    fresh, _ = build(family)
    torch.manual_seed(123)
    restored = WRAPPERS[kind]()(fresh)
    buffer.seek(0)
    restored.load_state_dict(torch.load(buffer))
    wrapped.eval()
    restored.eval()
    for a, b in zip(wrapped(x, return_risk=True), restored(x, return_risk=True), strict=True):
        assert torch.allclose(a, b, atol=1e-6)


@pytest.mark.parametrize(
    ("saved", "loaded", "named"),
    [
        (vote.Wrapper(n_voters=5), vote.Wrapper(n_voters=3), "'n_voters': 3"),
        (vote.Wrapper(n_voters=3), sculpt.Wrapper(), "capsa.voters"),
        (sculpt.Wrapper(), neo.Wrapper(), "capsa.scale"),
        (neo.Wrapper(latent_dim=4), neo.Wrapper(latent_dim=8), "'capsa.autoencoder.encoder_weight': [4, 64]"),
        (vote.Wrapper(n_voters=3), sample.Wrapper(), "capsa.voters"),
    ],
)
def test_checkpoint_from_other_wrapper_or_settings_is_refused(saved: capsa.Wrapper, loaded: capsa.Wrapper,
                                                             named: str) -> None:
    model, x = build("mlp")
    wrapped = saved(model)
    _ = wrapped(x)
    state = wrapped.state_dict()
    target = loaded(build("mlp")[0])
    with pytest.raises(RuntimeError, match=re.escape(named)):
        target.load_state_dict(state)
    assert list(target.capsa_parameters()) == []  # nothing half-built


def test_checkpoint_mismatch_in_user_keys_names_them() -> None:
    wrapped = vote.Wrapper()(archs.mlp(in_features=8))
    _ = wrapped(torch.randn(2, 8))
    other = vote.Wrapper()(archs.mlp(in_features=6))
    with pytest.raises(RuntimeError, match=r"size mismatch for 0\.weight"):
        other.load_state_dict(wrapped.state_dict())


def test_plain_model_checkpoint_needs_strict_false() -> None:
    model = archs.mlp()
    wrapped = vote.Wrapper()(archs.mlp())
    with pytest.raises(RuntimeError, match=r"no 'capsa\.' keys"):
        wrapped.load_state_dict(model.state_dict())
    wrapped.load_state_dict(model.state_dict(), strict=False)
    assert torch.equal(wrapped.state_dict()["0.weight"], model.state_dict()["0.weight"])


def test_eval_is_deterministic_and_batch_invariant(kind: str, family: str) -> None:
    model, x = build(family)
    wrapped = WRAPPERS[kind]()(model)
    wrapped.train()
    out, risk = wrapped(x, return_risk=True)
    (out.mean() + risk.mean()).backward()  # exercise training mode (running statistics, random voters)
    wrapped.eval()
    with torch.no_grad():
        batch_y, batch_r = wrapped(x, return_risk=True)
        again_y, again_r = wrapped(x, return_risk=True)
        assert torch.equal(batch_y, again_y) and torch.equal(batch_r, again_r)
        for i in (0, 17, 63):
            alone_y, alone_r = wrapped(x[i : i + 1], return_risk=True)
            assert close(alone_y[0], batch_y[i]) and close(alone_r[0], batch_r[i])


def test_first_call_under_inference_mode_then_training(kind: str) -> None:
    model, x = build("transformer")
    wrapped = WRAPPERS[kind]()(model).eval()
    with torch.inference_mode():
        _, risk = wrapped(x, return_risk=True)
    assert risk.max() > 0  # the attention fast path must not bypass capsa's layers
    wrapped.train()
    out, risk = wrapped(x, return_risk=True)
    (out.mean() + risk.mean()).backward()
    assert all(p.grad is not None for p in wrapped.capsa_parameters() if p.requires_grad)


def test_deepcopy_keeps_working(kind: str) -> None:
    model, x = build("mlp")
    wrapped = WRAPPERS[kind]()(model).eval()
    y, r = wrapped(x, return_risk=True)
    clone = copy.deepcopy(wrapped)
    y2, r2 = clone(x, return_risk=True)
    assert torch.equal(y, y2) and torch.equal(r, r2)


@pytest.fixture
def no_tf32() -> Iterator[None]:
    """TF32 (PyTorch's default for cuDNN convolutions) rounds differently per algorithm, and cuDNN picks algorithms
    by batch size: exact batch invariance on CUDA needs full float32, as the service's GPU workers use."""
    previous = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = previous


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_eval_is_batch_invariant(kind: str, family: str, no_tf32: None) -> None:
    model, x = build(family)
    wrapped = WRAPPERS[kind]()(model).eval().to("cuda")
    x = x.cuda()
    with torch.inference_mode():
        batch_y, batch_r = wrapped(x, return_risk=True)
        for i in (0, 17, 63):
            alone_y, alone_r = wrapped(x[i : i + 1], return_risk=True)
            assert close(alone_y[0], batch_y[i]) and close(alone_r[0], batch_r[i])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(kind: str, family: str, no_tf32: None) -> None:
    model, x = build(family)
    wrapped = WRAPPERS[kind]()(model).eval()
    y, r = wrapped(x, return_risk=True)
    wrapped.to("cuda")
    with torch.inference_mode():
        yc, rc = wrapped(x.cuda(), return_risk=True)
    assert torch.allclose(yc.cpu(), y, atol=1e-4, rtol=1e-3) and torch.allclose(rc.cpu(), r, atol=1e-4, rtol=1e-3)


# ------------------------------------------------------------------ specs
def test_spec_round_trip(kind: str) -> None:
    wrapper = WRAPPERS[kind]()
    spec = wrapper.to_spec()
    assert spec["wrapper"] == kind and spec["version"] == 1
    assert json.loads(json.dumps(spec)) == spec
    again = capsa.from_spec(spec)
    assert type(again) is type(wrapper) and again.to_spec() == spec


def test_configs_have_distinct_names_and_one_registry() -> None:
    assert (sculpt.Wrapper, vote.Wrapper, sample.Wrapper, neo.Wrapper) == (
        sculpt.SculptConfig, vote.VoteConfig, sample.SampleConfig, neo.NeoConfig)
    from capsa._wrapper import _REGISTRY, BUILTIN

    capsa.from_spec(vote.Wrapper().to_spec())  # imports every built-in
    assert {name: cls.__module__ for name, cls in _REGISTRY.items() if name in BUILTIN} == {
        name: module for name, (module, _) in BUILTIN.items()}


def test_capsa_torch_call_forms() -> None:
    """capsa-torch's documented call forms build the same wrappers here."""
    assert sculpt.Wrapper(sculpt.Normal) == sculpt.Wrapper() == sculpt.Wrapper(distribution=sculpt.Normal)
    assert vote.Wrapper(n_voters=3).n_voters == 3
    made = sample.Wrapper(n_samples=6, distribution=sample.Bernoulli(0.2))
    assert made.n_samples == 6 and made.distribution == sample.Bernoulli(p=0.2)
    with pytest.raises(ValueError, match="unknown distribution"):
        sculpt.Wrapper("Cauchy")


def test_every_constructor_parameter_is_in_the_spec(kind: str) -> None:
    wrapper = WRAPPERS[kind]()
    assert set(type(wrapper).model_fields) - {"inner"} == set(wrapper.to_spec()) - {"wrapper", "version"}
    assert "inner" not in wrapper.to_spec()  # single wrappers' specs are unchanged by composition


@pytest.mark.parametrize(
    "make",
    [
        lambda: vote.Wrapper(n_voters=0),
        lambda: vote.Wrapper(n_voters=1),
        lambda: sample.Wrapper(distribution=sample.Bernoulli(1.5)),
        lambda: sample.Wrapper(n_samples=1),
        lambda: sample.Gaussian(-1.0),
        lambda: sculpt.Wrapper(distribution="Cauchy"),
        lambda: sculpt.Wrapper(task="classification"),
        lambda: vote.Wrapper(task="ranking"),
        lambda: neo.Wrapper(latent_dim=0),
        lambda: vote.Wrapper(voters=3),
        lambda: capsa.from_spec({"wrapper": "bagging", "version": 1}),
        lambda: capsa.from_spec({"wrapper": "vote", "version": 2}),
        lambda: capsa.from_spec({"wrapper": "vote", "version": 1, "n_voters": 3, "colour": "red"}),
        lambda: capsa.from_spec(["vote"]),
    ],
)
def test_bad_arguments_raise_value_error(make) -> None:
    with pytest.raises(ValueError):
        make()


# ------------------------------------------------------------------ models a wrapper cannot handle
class TwoOutputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.fc(x), self.fc(x)


class NoBatch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x).sum(dim=0)


def test_unsupported_models_fail_clearly(kind: str) -> None:
    with pytest.raises(TypeError, match="TwoOutputs returned tuple"):
        WRAPPERS[kind]()(TwoOutputs())(torch.randn(3, 4))
    with pytest.raises(ValueError, match="batch dimension first"):
        WRAPPERS[kind]()(NoBatch())(torch.randn(3, 4))
    with pytest.raises(ValueError, match="calls no Linear or ConvNd"):
        WRAPPERS[kind]()(nn.Sequential(nn.Tanh()))(torch.randn(3, 4))
    with pytest.raises(TypeError, match="tensor"):
        WRAPPERS[kind]()(archs.mlp())({"x": torch.randn(3, 8)})
    with pytest.raises(TypeError, match=r"torch\.nn\.Module"):
        WRAPPERS[kind]()(lambda x: x)


def test_sample_needs_a_hidden_layer() -> None:
    with pytest.raises(ValueError, match="no hidden Linear/ConvNd"):
        sample.Wrapper()(nn.Linear(4, 1))(torch.randn(2, 4))


def test_wrapping_twice_is_refused() -> None:
    with pytest.raises(TypeError, match="already wrapped"):
        vote.Wrapper()(vote.Wrapper()(archs.mlp()))


# ------------------------------------------------------------------ training semantics
def test_neo_risk_trains_only_capsa_parameters() -> None:
    model, x = build("mlp")
    wrapped = neo.Wrapper()(model)
    _ = wrapped(x)
    wrapped.train()
    _, risk = wrapped(x, return_risk=True)
    risk.mean().backward()
    assert all(p.grad is None for p in wrapped.user_parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in wrapped.capsa_parameters())


def test_vote_training_answers_each_sample_with_one_voter() -> None:
    model, x = build("mlp")
    wrapped = vote.Wrapper(n_voters=4)(model)
    wrapped.eval()
    with torch.no_grad():
        _ = wrapped(x)
        hook_voters = []
        handle = wrapped.model[-1].register_forward_hook(lambda m, a, o: hook_voters.append(o))
        wrapped.train()
        torch.manual_seed(0)
        out = wrapped(x)
        handle.remove()
    voters = hook_voters[0].reshape(4, 64, -1)
    matches = (voters == out.unsqueeze(0)).all(dim=-1)  # which voter answered each sample
    assert (matches.sum(dim=0) >= 1).all()
    assert len(set(matches.float().argmax(dim=0).tolist())) > 1  # different samples, different voters


def test_sculpt_trains_with_gaussian_nll() -> None:
    torch.manual_seed(0)
    x = torch.rand(512, 1) * 2 - 1
    y = 2 * x + 0.5 * torch.randn_like(x)
    wrapped = sculpt.Wrapper()(nn.Sequential(nn.Linear(1, 16), nn.ReLU(), nn.Linear(16, 1)))
    _ = wrapped(x)
    optimizer = torch.optim.Adam(wrapped.parameters(), lr=1e-2)
    for _ in range(400):
        pred, risk = wrapped(x, return_risk=True)
        loss = nn.functional.gaussian_nll_loss(pred, y, risk**2)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    _, risk = wrapped.eval()(x, return_risk=True)
    assert 0.4 < risk.mean().item() < 0.6  # the true noise scale is 0.5


def test_wrapping_the_same_instance_again_is_refused() -> None:
    model = archs.mlp()
    wrapped = vote.Wrapper()(model)
    with pytest.raises(TypeError, match=r"already wrapped by capsa\.vote"):
        sculpt.Wrapper()(model)
    _ = wrapped(torch.randn(2, 8))
    with pytest.raises(TypeError, match="already wrapped"):
        sculpt.Wrapper()(copy.deepcopy(model))  # the copy carries vote's layer hooks
    sculpt.Wrapper()(archs.mlp())


def test_checkpoint_key_order_does_not_matter(kind: str) -> None:
    model, x = build("transformer")
    wrapped = WRAPPERS[kind]()(model).eval()
    expected = wrapped(x, return_risk=True)
    shuffled = dict(reversed(list(wrapped.state_dict().items())))
    restored = WRAPPERS[kind]()(build("transformer")[0])
    restored.load_state_dict(shuffled)
    for a, b in zip(expected, restored.eval()(x, return_risk=True), strict=True):
        assert torch.allclose(a, b, atol=1e-6)


class InputSkip(nn.Module):
    """A residual from the raw input: the passes cannot fork after any layer, only at the input."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.out = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(x + self.fc2(torch.relu(self.fc1(x))))


def test_sample_forks_passes_before_skip_connections_rejoin() -> None:
    model, x = build("cnn")  # the first noise site sits inside a residual block
    wrapped = sample.Wrapper()(model).eval()
    y, risk = wrapped(x, return_risk=True)
    assert wrapped._fork_at == "stem.0"  # the stem runs once, the block's skip path carries every pass
    skip = sample.Wrapper(noise_layers=2)(InputSkip()).eval()
    xs = torch.randn(5, 4)
    y, risk = skip(xs, return_risk=True)
    assert skip._fork_at is None and y.shape == risk.shape == (5, 1) and risk.max() > 0
    alone_y, alone_r = skip(xs[2:3], return_risk=True)
    assert close(alone_y[0], y[2]) and close(alone_r[0], risk[2])


def test_loading_with_assign_and_changing_dtype_take_effect(kind: str) -> None:
    model, x = build("mlp")
    source = WRAPPERS[kind]()(model).eval()
    expected = source(x, return_risk=True)
    target = WRAPPERS[kind]()(build("mlp")[0]).eval()
    _ = target(x)  # built (and any per-layer lookups cached) before the load
    target.load_state_dict(source.state_dict(), assign=True)
    for a, b in zip(expected, target(x, return_risk=True), strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    doubled = target.double()(x.double(), return_risk=True)
    for a, b in zip(expected, doubled, strict=True):
        assert b.dtype == torch.float64 and torch.allclose(a.double(), b, atol=1e-5)


@pytest.mark.parametrize(
    ("make", "members"),
    [(lambda: vote.Wrapper(n_voters=6), 6), (lambda: sample.Wrapper(n_samples=6), 6)],
)
def test_shared_prefix_runs_once_and_members_run_batched(make, members: int) -> None:
    model = archs.mlp(in_features=8, hidden=16, depth=3)  # Linear layers at 0, 2, 4 and the output at 6
    wrapped = make()(model).eval()
    seen: dict[str, list[int]] = {}
    for name in ("0", "2", "4", "6"):
        model.get_submodule(name).register_forward_pre_hook(
            lambda m, args, name=name: seen.setdefault(name, []).append(args[0].shape[0])
        )
    _ = wrapped(torch.randn(5, 8), return_risk=True)
    seen.clear()
    _ = wrapped(torch.randn(5, 8), return_risk=True)
    assert seen["0"] == [5]  # the input layer runs once, for the batch alone
    if isinstance(wrapped, vote.VoteModel):
        assert seen["2"] == seen["4"] == seen["6"] == [5]  # trunk shared; voters computed inside one call
    else:  # passes fork after layer 0 (the first noise site is layer 2) and run as one batch of 6 x 5
        assert seen["2"] == [5] and seen["4"] == seen["6"] == [members * 5]
