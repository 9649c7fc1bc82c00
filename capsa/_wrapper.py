"""The machinery every capsa wrapper shares.

A wrapper is two things: a *config* (`Wrapper`, a frozen pydantic model that round-trips through a JSON spec with a
version, like torchao's per-transformation configs) and the *wrapped module* it builds (`WrappedModel`), which
leaves the user's model untouched and attaches capsa's own state under the `capsa` child module.

Capsa's parameters are created lazily: the first call with inputs traces which layers the model really calls, the
wrapper picks its *sites* among them (for example the output layer) and builds its parameters next to them. A
checkpoint can also create them before any call, from the shapes it holds.

The wrapper's layer hooks are inert outside a wrapped forward: the user's own model, called directly, computes
exactly what it computed before wrapping. The per-call state lives in a thread-local table for the duration of
one forward, so one wrapped model serves many threads at once.

Composition is nesting: a wrapper applied to a wrapped model wraps the whole stack (see `ORDER`). The outer
wrapper attaches its hooks to the same user layers, runs the inner wrapper's forward inside its own, and combines
the inner risk with its own into a `capsa.Risk`.
"""

from __future__ import annotations

import functools
import importlib
import threading
import warnings
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, cast

import torch
from pydantic import BaseModel, ConfigDict, field_validator, model_validator
from torch import Tensor, nn

from capsa._risk import Risk

__all__ = ["BUILTIN", "ORDER", "LayerCall", "WrappedModel", "Wrapper", "from_spec", "is_wrapped"]

_REGISTRY: dict[str, type[Wrapper]] = {}
#: User models that carry a wrapper's hooks: wrapping one again would run both wrappers' hooks.
_WRAPPED: weakref.WeakKeyDictionary[nn.Module, str] = weakref.WeakKeyDictionary()

#: The built-in wrappers, in one table: name -> (module that defines its config, composition level). Each config
#: class registers itself under its name when its module is imported. Composition order: a wrapper may wrap a stack
#: whose wrappers all have a lower level. sculpt (aleatoric, a head on the output layer) goes innermost, so that
#: vote replicates it per voter and sample feeds it the noisy passes; vote and sample (two ways to the same
#: epistemic risk) do not stack on each other; neo reads hidden layers and goes outermost.
BUILTIN: dict[str, tuple[str, int]] = {
    "sculpt": ("capsa.sculpt", 0),
    "vote": ("capsa.vote", 1),
    "sample": ("capsa.sample", 1),
    "neo": ("capsa.neo", 2),
}
ORDER: dict[str, int] = {name: level for name, (_, level) in BUILTIN.items()}
#: Per-thread table of the forwards in progress: wrapped model -> its `_CallState`.
_ACTIVE = threading.local()
#: Building (first call) traces and probes the model; one build at a time.
_BUILD_LOCK = threading.RLock()

#: Layer types a wrapper may attach to: they carry the learned features and have a clear feature dimension.
SITE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.modules.conv._ConvNd)


class Wrapper(BaseModel):
    """Configuration of a risk-aware wrapper; calling it on a model returns the wrapped model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: Name in specs (``{"wrapper": name, ...}``); set by each concrete wrapper.
    name: ClassVar[str]
    #: Spec format version of this wrapper.
    version: ClassVar[int] = 1
    #: The module class this config builds.
    wrapped_class: ClassVar[type[WrappedModel]]
    #: The kind of risk this wrapper gives (a `capsa.Risk` attribute): aleatoric, epistemic or novelty.
    risk_kind: ClassVar[str]

    #: The wrapper this one wraps (composition), or None; rebuilt first when this config is called on a model.
    inner: Wrapper | None = None

    @field_validator("inner", mode="before")
    @classmethod
    def _inner_from_spec(cls, value: Any) -> Any:
        return from_spec(value) if isinstance(value, Mapping) else value

    @model_validator(mode="after")
    def _order(self) -> Wrapper:
        if self.inner is not None:
            check_order(self.name, self.inner.stack_names())
        return self

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            _REGISTRY[cls.name] = cls

    def __call__(self, model: nn.Module) -> WrappedModel:
        if self.inner is not None:
            if isinstance(model, WrappedModel):
                raise TypeError(
                    f"capsa.{self.name}: this wrapper already describes the stack {self.describe()}; "
                    "call it on a plain model"
                )
            model = self.inner(model)
        return self.wrapped_class(model, self.model_copy(update={"inner": None}))

    def stack_names(self) -> list[str]:
        """Wrapper names from this one inwards."""
        return [self.name] + (self.inner.stack_names() if self.inner is not None else [])

    def describe(self) -> str:
        """The stack as a call expression, e.g. ``vote(sculpt(model))``."""
        names = self.stack_names()
        return "(".join(names) + "(model" + ")" * len(names)

    def to_spec(self) -> dict[str, Any]:
        """A JSON-serialisable description from which `capsa.from_spec` rebuilds an equal wrapper (and its stack).

        Composed stacks nest: ``{"wrapper": "vote", "version": 1, ..., "inner": {"wrapper": "sculpt", ...}}``.
        """
        spec = {"wrapper": self.name, "version": self.version, **self.model_dump(mode="json", exclude={"inner"})}
        if self.inner is not None:
            spec["inner"] = self.inner.to_spec()
        return spec


def check_order(outer: str, inner: list[str]) -> None:
    """Refuse (`TypeError`) a nesting that means nothing, naming the order that works."""
    for name in inner:
        if name == outer:
            raise TypeError(f"capsa.{outer}: the model is already wrapped by capsa.{outer}; wrap it once")
        if ORDER[name] == ORDER[outer]:
            raise TypeError(
                f"capsa.{outer} cannot wrap a capsa.{name} model: both give epistemic risk from members; use one "
                f"of them (compose either with sculpt inside and neo outside, e.g. neo({outer}(sculpt(model))))"
            )
        if ORDER[name] > ORDER[outer]:
            raise TypeError(
                f"capsa.{outer} cannot wrap a capsa.{name} model: wrap in the order {name}({outer}(model)), i.e. "
                f"capsa.{name}.Wrapper()(capsa.{outer}.Wrapper()(model))"
            )


def from_spec(spec: Mapping[str, Any]) -> Wrapper:
    """Rebuild a wrapper from `Wrapper.to_spec()` output; raises `ValueError` naming what is wrong."""
    if not isinstance(spec, Mapping):
        raise ValueError(f"capsa spec must be a JSON object, got {type(spec).__name__}")
    for module, _ in BUILTIN.values():  # register them (capsa imports its modules lazily)
        importlib.import_module(module)
    options = dict(spec)
    name = options.pop("wrapper", None)
    version = options.pop("version", None)
    if name not in _REGISTRY:
        known = ", ".join(sorted(_REGISTRY))
        raise ValueError(f"capsa spec: unknown wrapper {name!r} (known: {known})")
    cls = _REGISTRY[name]
    if version != cls.version:
        raise ValueError(f"capsa spec: wrapper {name!r} has spec version {cls.version}, got version {version!r}")
    return cls.model_validate(options)


def is_wrapped(model: object) -> bool:
    """Whether `model` is a module built by a capsa wrapper."""
    return isinstance(model, WrappedModel)


@dataclass
class LayerCall:
    """One call of a candidate site layer, as seen while tracing the model's first forward."""

    name: str
    module: nn.Module
    input_shape: torch.Size
    output_shape: torch.Size


@dataclass
class _CallState:
    """Per-forward scratch space shared between the wrapper's forward and its layer hooks (one per call)."""

    batch: int = 0
    return_risk: bool = False
    fired: dict[str, int] = field(default_factory=dict)
    extra: dict[str, Tensor] = field(default_factory=dict)


def _active_states() -> dict[WrappedModel, _CallState]:
    states = getattr(_ACTIVE, "states", None)
    if states is None:
        states = _ACTIVE.states = {}
    return states


def site_key(name: str) -> str:
    """Module names contain dots, which module containers refuse as keys."""
    return name.replace(".", "-")


def site_name(key: str) -> str:
    return key.replace("-", ".")


def feature_dim(module: nn.Module) -> int:
    """The dimension that indexes a site layer's features: last for Linear, channels for ConvNd."""
    return -1 if isinstance(module, nn.Linear) else 1


class WrappedModel(nn.Module):
    """A user model plus capsa's state; `forward(x, return_risk=True)` returns `(prediction, risk)`.

    The state dict holds the user's keys exactly as `model.state_dict()` names them, and capsa's under `capsa.`.
    """

    wrapper: Wrapper
    #: The `capsa.Calibration` of the bundle this model was loaded from (`capsa.load_bundle`), else None.
    calibration: Any = None

    def __init__(self, model: nn.Module, wrapper: Wrapper) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"capsa.{wrapper.name}: expected a torch.nn.Module, got {type(model).__name__}")
        if isinstance(model, WrappedModel):
            check_order(wrapper.name, model.wrapper.stack_names())
        if model in _WRAPPED or (not isinstance(model, WrappedModel) and _carries_capsa_hooks(model)):
            raise TypeError(
                f"capsa.{wrapper.name}: this {type(model).__name__} instance is already wrapped by "
                f"capsa.{_WRAPPED.get(model, 'a wrapper')} (or is a copy of one that is); wrap a fresh instance"
            )
        _WRAPPED[model] = wrapper.name
        super().__init__()
        self.model = model
        self.capsa = nn.Module()
        self.__dict__["wrapper"] = wrapper.model_copy(update={"inner": model.wrapper}) if self.composed else wrapper
        self._sites: list[str] = []  # the hooked layers, in call order (empty until built)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._built = False
        self._handed_out = False
        self._strict_load = True
        self._has_attention = any(isinstance(m, nn.MultiheadAttention) for m in model.modules())
        # torch leaves these two registration methods unannotated
        self.register_state_dict_post_hook(_user_keys_unprefixed)  # type: ignore[no-untyped-call]
        self.register_load_state_dict_pre_hook(WrappedModel._load_pre_hook)  # type: ignore[no-untyped-call]

    # ----------------------------------------------------------------- public surface
    @property
    def composed(self) -> bool:
        """Whether this wraps another capsa wrapper (then `forward` returns a `capsa.Risk`)."""
        return isinstance(self.model, WrappedModel)

    @property
    def user_model(self) -> nn.Module:
        """The user's own model at the bottom of the stack."""
        model = self.model
        while isinstance(model, WrappedModel):
            model = model.model
        return model

    def stack(self) -> list[WrappedModel]:
        """The wrapped models of the stack, from this one inwards."""
        return [self] + (self.model.stack() if isinstance(self.model, WrappedModel) else [])

    def capsa_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters capsa added, by every wrapper of the stack (empty before the first call or checkpoint load)."""
        for wrapped in self.stack():
            yield from wrapped.capsa.parameters()

    def user_parameters(self) -> Iterator[nn.Parameter]:
        """The wrapped model's own parameters."""
        return self.user_model.parameters()

    def named_parameters(self, *args: Any, **kwargs: Any) -> Iterator[tuple[str, nn.Parameter]]:
        # Remember that parameters were handed out (to an optimizer, most likely) before capsa created its own.
        if not self._built:
            for wrapped in self.stack():
                wrapped.__dict__["_handed_out"] = True
        return super().named_parameters(*args, **kwargs)

    def forward(self, x: Tensor, *args: Any, return_risk: bool = False, **kwargs: Any) -> Any:
        prediction, risk = self._forward(x, args, kwargs, return_risk)
        if not return_risk:
            return prediction
        return prediction, (risk if self.composed else getattr(risk, self.wrapper.risk_kind))

    def predict(self, x: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Risk]:
        """``(prediction, risk)`` as ``self(x, return_risk=True)`` computes them, with ``risk`` a `capsa.Risk` for
        every stack, a single wrapper's too (its one component named, and for classifiers the log spread that
        `capsa.risk_score` ranks by). The server and `capsa.calibrate` score models through this."""
        return self._forward(x, args, kwargs, True)

    def _forward(
        self, x: Tensor, args: tuple[Any, ...], kwargs: dict[str, Any], return_risk: bool
    ) -> tuple[Tensor, Risk]:
        if not isinstance(x, Tensor):
            raise TypeError(
                f"capsa.{self.wrapper.name}: the model input must be a tensor with the batch dimension first, "
                f"got {type(x).__name__}"
            )
        if x.dim() == 0:
            raise ValueError(f"capsa.{self.wrapper.name}: the model input has no batch dimension (a 0-d tensor)")
        with _fastpath_disabled(self._has_attention):
            if not self._built:
                with _BUILD_LOCK:
                    if not self._built:
                        self._build(x, args, kwargs)
            return self._run(x, args, kwargs, return_risk)

    def _active_state(self) -> _CallState | None:
        """This thread's state of the forward in progress, or None outside a wrapped forward."""
        states = getattr(_ACTIVE, "states", None)
        return None if states is None else states.get(self)

    def _run(
        self, x: Tensor, args: tuple[Any, ...], kwargs: dict[str, Any], return_risk: bool
    ) -> tuple[Tensor, Risk]:
        """One wrapped forward: the model (or the inner stack) with capsa's hooks active, then the reduction."""
        states = _active_states()
        state = _CallState(batch=x.shape[0], return_risk=return_risk)
        previous = states.get(self)
        states[self] = state
        try:
            prepared = self._prepare_input(x, state)
            inner: Risk | None = None
            if isinstance(self.model, WrappedModel):
                out, inner = self.model._run(prepared, args, kwargs, return_risk)
            else:
                out = self.model(prepared, *args, **kwargs)
            if not isinstance(out, Tensor):
                raise TypeError(
                    f"capsa.{self.wrapper.name}: {type(self.user_model).__name__} returned {type(out).__name__}; "
                    "capsa wrappers need a model with one tensor output"
                )
            for name in self._sites:
                if state.fired.get(name, 0) != 1:
                    raise RuntimeError(
                        f"capsa.{self.wrapper.name}: layer {name!r} ran {state.fired.get(name, 0)} times in this "
                        "forward (expected once, as when the wrapper was built); the model's call graph changed"
                    )
            return self._finish(out, inner, state)
        finally:
            if previous is None:
                del states[self]
            else:
                states[self] = previous

    # ----------------------------------------------------------------- wrapper-specific parts
    def _select_sites(self, calls: list[LayerCall]) -> list[str]:
        """Names of the layers this wrapper attaches to, from the traced calls in call order."""
        raise NotImplementedError

    def _create_state(self, calls: dict[str, LayerCall]) -> None:
        """Create capsa's parameters and buffers for the selected sites (first call, no checkpoint)."""
        raise NotImplementedError

    def _create_state_from_checkpoint(self, shapes: dict[str, torch.Size]) -> None:
        """Create capsa's tensors from a checkpoint's `capsa.`-relative keys and shapes, validating them."""
        raise NotImplementedError

    def _check_state(self, calls: dict[str, LayerCall]) -> None:
        """Check state created from a checkpoint against the traced sites (first call after loading)."""

    def _site_hook(
        self, name: str, module: nn.Module, args: tuple[Any, ...], output: Tensor, state: _CallState
    ) -> Tensor | None:
        """Forward hook on each site, during a wrapped forward only; may replace the layer's output."""
        raise NotImplementedError

    def _finish(self, out: Tensor, inner: Risk | None, state: _CallState) -> tuple[Tensor, Risk]:
        """Turn the model's raw output (and the inner stack's risk, when composed) into `(prediction, risk)`."""
        raise NotImplementedError

    def _prepare_input(self, x: Tensor, state: _CallState) -> Tensor:
        """The input the model sees (a wrapper may replicate it)."""
        return x

    def _settle(self, x: Tensor, args: tuple[Any, ...], kwargs: dict[str, Any], calls: list[LayerCall]) -> None:
        """Last step of building, with the site hooks in place (a wrapper may probe the model here)."""

    # ----------------------------------------------------------------- building
    def _build(self, x: Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if isinstance(self.model, WrappedModel) and not self.model._built:
            self.model._build(x, args, kwargs)  # inner hooks first: they run first on a shared layer
        calls = self._trace(x, args, kwargs)
        sites = self._select_sites(calls)
        by_name = {c.name: c for c in calls}
        with torch.inference_mode(False), torch.no_grad():
            if any(True for _ in self.capsa.named_parameters()) or any(True for _ in self.capsa.buffers()):
                self._check_state(by_name)
            else:
                self._create_state(by_name)
                created = sum(p.numel() for p in self.capsa.parameters() if p.requires_grad)
                if created and self._handed_out:
                    warnings.warn(
                        f"capsa.{self.wrapper.name} created {created} trainable parameters on the first call, after "
                        "the wrapped model's parameters() were already handed out (to an optimizer?): those do not "
                        "include them, so they will not train. Call the wrapped model once (e.g. on one batch) "
                        "before building the optimizer, or build the optimizer again now",
                        UserWarning,
                        stacklevel=5,
                    )
        self._sites, self._handles = [], []
        try:
            for name in sites:
                self._hook(name)
            self._settle(x, args, kwargs, calls)
        except Exception:
            for handle in self._handles:
                handle.remove()
            self._sites, self._handles = [], []
            raise
        self._built = True

    def _hook(self, name: str) -> torch.utils.hooks.RemovableHandle:
        """Route layer `name`'s forward through `_site_hook`, checked to run once per forward."""
        module = self.user_model.get_submodule(name)
        handle = module.register_forward_hook(functools.partial(self._counted_hook, name))
        self._sites.append(name)
        self._handles.append(handle)
        return handle

    def _counted_hook(self, name: str, module: nn.Module, args: tuple[Any, ...], output: Any) -> Tensor | None:
        states = getattr(_ACTIVE, "states", None)
        state = None if states is None else states.get(self)
        if state is None:
            return None  # outside a wrapped forward (in this thread): the user's model runs untouched
        state.fired[name] = state.fired.get(name, 0) + 1
        if not isinstance(output, Tensor):
            raise TypeError(f"capsa.{self.wrapper.name}: layer {name!r} returned {type(output).__name__}")
        return self._site_hook(name, module, args, output, state)

    def _trace(self, x: Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[LayerCall]:
        """Run the model once (eval mode, no grad) and record the site-type layers it calls, in order."""
        model = self.user_model
        names = {m: n for n, m in model.named_modules() if isinstance(m, SITE_TYPES)}
        calls: list[LayerCall] = []

        def record(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
            if inputs and isinstance(inputs[0], Tensor) and isinstance(output, Tensor):
                calls.append(LayerCall(names[module], module, inputs[0].shape, output.shape))

        handles = [m.register_forward_hook(record) for m in names]
        modes = {m: m.training for m in model.modules()}
        try:
            model.eval()
            with torch.no_grad():
                out = model(x, *args, **kwargs)
        finally:
            for h in handles:
                h.remove()
            for m, mode in modes.items():
                m.training = mode
        if not isinstance(out, Tensor):
            raise TypeError(
                f"capsa.{self.wrapper.name}: {type(model).__name__} returned {type(out).__name__}; "
                "capsa wrappers need a model with one tensor output"
            )
        if out.dim() == 0 or out.shape[0] != x.shape[0]:
            raise ValueError(
                f"capsa.{self.wrapper.name}: {type(model).__name__} maps a batch of {x.shape[0]} to an output "
                f"of shape {tuple(out.shape)}; capsa needs the batch dimension first in input and output"
            )
        counts: dict[str, int] = {}
        for c in calls:
            counts[c.name] = counts.get(c.name, 0) + 1
        self._trace_counts = counts
        return calls

    def _output_layer(self, calls: list[LayerCall]) -> LayerCall:
        """The last Linear/ConvNd layer the model calls: the one that produces the prediction."""
        if not calls:
            raise ValueError(
                f"capsa.{self.wrapper.name}: {type(self.user_model).__name__} calls no Linear or ConvNd layer; "
                f"capsa.{self.wrapper.name} attaches to the layer that produces the prediction"
            )
        last = calls[-1]
        if self._trace_counts[last.name] != 1:
            raise ValueError(
                f"capsa.{self.wrapper.name}: output layer {last.name!r} is called "
                f"{self._trace_counts[last.name]} times per forward; it must be called once"
            )
        return last

    def _require_batch_first(self, name: str, tensor: Tensor, batch: int) -> None:
        if tensor.dim() == 0 or tensor.shape[0] != batch:
            raise ValueError(
                f"capsa.{self.wrapper.name}: layer {name!r} sees a tensor of shape {tuple(tensor.shape)} but the "
                f"batch has {batch} samples; capsa needs the batch dimension first at this layer"
            )

    # ----------------------------------------------------------------- checkpoints
    def _load_pre_hook(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        capsa_prefix = prefix + "capsa."
        own = tuple(capsa_prefix + group + "." for group in self._groups())
        for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(own)]:
            if key.startswith(capsa_prefix) and not self.composed:
                continue  # not this wrapper's: the standard unexpected-key check names it
            state_dict[prefix + "model." + key[len(prefix) :]] = state_dict.pop(key)
        shapes = {k[len(capsa_prefix) :]: v.shape for k, v in state_dict.items() if k.startswith(capsa_prefix)}
        has_state = any(True for _ in self.capsa.parameters()) or any(True for _ in self.capsa.buffers())
        if has_state:
            return  # already built: the standard key/shape checks apply
        if shapes:
            with torch.inference_mode(False), torch.no_grad():
                self._create_state_from_checkpoint(shapes)
        elif self._strict_load and self._needs_state():
            raise RuntimeError(
                f"capsa.{self.wrapper.name}: the checkpoint has no 'capsa.' keys (it was saved from an unwrapped "
                "model, or before the wrapped model's first call); load it with strict=False to keep only the "
                "user's weights"
            )

    def _needs_state(self) -> bool:
        """Whether this wrapper always has capsa tensors in its state dict once built."""
        return True

    def _groups(self) -> tuple[str, ...]:
        """The names under `capsa.` that hold this wrapper's tensors (in a stack, the others belong inside)."""
        return ()

    def _apply(self, fn: Any, recurse: bool = True) -> WrappedModel:
        for wrapped in self.stack():
            wrapped.__dict__["_param_cache"] = {}  # .to()/.half() may replace parameter objects
        super()._apply(fn, recurse)  # type: ignore[no-untyped-call]  # unannotated in torch; returns self
        return self

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """`nn.Module.load_state_dict`, creating capsa's lazy tensors from the checkpoint if needed."""
        stack = self.stack()
        for wrapped in stack:
            wrapped._strict_load = strict  # torch hands its hooks strict=True whatever the caller asked
            wrapped.__dict__["_param_cache"] = {}  # assign=True replaces parameter objects
        try:
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        except RuntimeError as exc:
            # The user model lives under `model.` internally; report keys as the checkpoint names them.
            message = str(exc)
            for depth in range(len(stack), 0, -1):
                message = message.replace('"' + "model." * depth, '"').replace("for " + "model." * depth, "for ")
            raise RuntimeError(message) from None


def _user_keys_unprefixed(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    """State-dict post hook: user keys appear exactly as the user's model names them."""
    inner = prefix + "model."
    items = list(state_dict.items())
    state_dict.clear()
    for key, value in items:
        state_dict[prefix + key[len(inner) :] if key.startswith(inner) else key] = value
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is not None:
        for key in [k for k in metadata if k == prefix + "model" or k.startswith(inner)]:
            metadata[prefix + key[len(inner) :] if key.startswith(inner) else prefix.rstrip(".")] = metadata.pop(key)


def _carries_capsa_hooks(model: nn.Module) -> bool:
    for module in model.modules():
        for hook in module._forward_hooks.values():
            if isinstance(hook, functools.partial) and isinstance(getattr(hook.func, "__self__", None), WrappedModel):
                return True
    return False


class _fastpath_disabled:
    """Turn off PyTorch's fused attention fast path, which bypasses submodule calls (and so capsa's hooks).

    The switch is process-wide, so concurrent wrapped forwards count themselves in: the first turns it off, the
    last restores what it was.
    """

    _lock = threading.Lock()
    _users = 0
    _previous = True

    def __init__(self, active: bool) -> None:
        self.active = active and hasattr(torch.backends, "mha")

    def __enter__(self) -> None:
        if self.active:
            cls = type(self)
            with cls._lock:
                if cls._users == 0:
                    cls._previous = torch.backends.mha.get_fastpath_enabled()
                    torch.backends.mha.set_fastpath_enabled(False)
                cls._users += 1

    def __exit__(self, *exc: object) -> None:
        if self.active:
            cls = type(self)
            with cls._lock:
                cls._users -= 1
                if cls._users == 0:
                    torch.backends.mha.set_fastpath_enabled(cls._previous)


def find_site_layer(model: nn.Module, name: str, who: str) -> nn.Module:
    """The model's layer called `name`, which must be a site type; errors name the checkpoint's claim."""
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise RuntimeError(f"capsa.{who}: the checkpoint names layer {name!r}, which the model does not have") from None
    if not isinstance(module, SITE_TYPES):
        raise RuntimeError(
            f"capsa.{who}: the checkpoint names layer {name!r}, a {type(module).__name__}, not a Linear/ConvNd layer"
        )
    return module


class OutputLayerModel(WrappedModel):
    """A wrapper whose state sits beside the model's output layer, as `capsa.<group>.<layer>.<tensor>`."""

    #: The key under `capsa.` that holds this wrapper's tensors.
    group: ClassVar[str]

    def _new_state(self, module: nn.Module) -> dict[str, Tensor]:
        """Freshly initialised tensors for `module` (trainable unless the wrapper freezes them)."""
        raise NotImplementedError

    def _select_sites(self, calls: list[LayerCall]) -> list[str]:
        return [self._output_layer(calls).name]

    def _groups(self) -> tuple[str, ...]:
        return (self.group,)

    def site_state(self, name: str) -> nn.ParameterDict:
        return cast(nn.ParameterDict, getattr(self.capsa, self.group)[site_key(name)])

    def site_params(self, name: str) -> dict[str, Tensor]:
        """`site_state(name)` as a plain dict, cached: looking it up through the modules costs on every call."""
        cache: dict[str, dict[str, Tensor]] = self.__dict__.setdefault("_param_cache", {})
        params = cache.get(name)
        if params is None:
            params = cache[name] = dict(self.site_state(name).items())
        return params

    def _install(self, name: str, tensors: dict[str, Tensor]) -> None:
        self.__dict__["_param_cache"] = {}
        params = {k: v if isinstance(v, nn.Parameter) else nn.Parameter(v) for k, v in tensors.items()}
        setattr(self.capsa, self.group, nn.ModuleDict({site_key(name): nn.ParameterDict(params)}))

    def _create_state(self, calls: dict[str, LayerCall]) -> None:
        (name,) = self._select_sites(list(calls.values()))
        self._install(name, self._new_state(self.user_model.get_submodule(name)))

    def _create_state_from_checkpoint(self, shapes: dict[str, torch.Size]) -> None:
        who, group = self.wrapper.name, self.group
        well_formed = [k for k in shapes if k.startswith(group + ".") and k.count(".") == 2]
        sites = {k.split(".")[1] for k in well_formed}
        if len(well_formed) != len(shapes) or len(sites) != 1:
            raise RuntimeError(
                f"capsa.{who}: the checkpoint's capsa keys {sorted('capsa.' + k for k in shapes)} are not those "
                f"of capsa.{who} (expected capsa.{group}.<output layer>.<tensor>)"
            )
        (key,) = sites
        module = find_site_layer(self.user_model, site_name(key), who)
        state = self._new_state(module)
        expected = {f"capsa.{group}.{key}.{k}": list(v.shape) for k, v in state.items()}
        got = {f"capsa.{k}": list(v) for k, v in shapes.items()}
        if expected != got:
            raise RuntimeError(
                f"capsa.{who}: the checkpoint's capsa tensors {got} differ from what this wrapper "
                f"({self.wrapper.to_spec()}) builds for layer {site_name(key)!r}: {expected}"
            )
        self._install(site_name(key), state)  # the load that follows overwrites the values

    def _check_state(self, calls: dict[str, LayerCall]) -> None:
        (name,) = self._select_sites(list(calls.values()))
        loaded = [site_name(k) for k in getattr(self.capsa, self.group)]
        if loaded != [name]:
            raise RuntimeError(
                f"capsa.{self.wrapper.name}: the checkpoint holds state for layer {loaded[0]!r}, "
                f"but the model's output layer is {name!r}"
            )
