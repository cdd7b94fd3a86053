"""Method configs: the frozen dataclass base, the name registry and the JSON round trip.

A method config is a frozen, keyword-only dataclass. It says *where* the method acts (``targets``,
``exclude``, ``layers``) and *how* (its own fields). ``build()`` turns it into one component per
resolved site. Configs are registered by name (``@register("lora")``) so that strings like
``"lora"`` work in :meth:`Adapters.add` and third parties can add methods; presets are named
config instances (``register_preset("seq_bn", Bottleneck(...))``).
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from torch import nn

    from .component import Component

__all__ = ["AdapterConfig", "register", "register_preset", "get_config", "config_from_dict", "registered"]

_METHODS: dict[str, type[AdapterConfig]] = {}
_PRESETS: dict[str, AdapterConfig] = {}


@dataclasses.dataclass(frozen=True, kw_only=True)
class AdapterConfig:
    """Base of every method config.

    Args:
        targets: where the method acts. Each entry is a role (``"attn.q"``, see ``profiles.py``), an exact
            module name, a name suffix (``"q_proj"``), a ``re.fullmatch`` pattern over full module names, a
            module type (``nn.Linear``), or ``"all-linear"`` (every linear layer except output heads).
            ``None`` uses the method's default targets.
        exclude: the same kinds of selectors; matching modules are removed from ``targets``.
        layers: keep only sites inside these layer indices (the first number in the module path).
        heads: modules (names or roles, e.g. ``["classifier"]`` or ``["head"]``) that get a trainable copy
            owned by this adapter (peft's ``modules_to_save``). The base module is never changed.
    """

    method: ClassVar[str] = ""
    schema_version: ClassVar[int] = 1
    standalone: ClassVar[bool] = True  # False: only created by another verb (e.g. fusion by add_fusion)
    # why a non-standalone method is not trained on its own, and what to do instead (shown by the CLI)
    standalone_note: ClassVar[str] = ""

    targets: Sequence[Any] | None = None
    exclude: Sequence[Any] = ()
    layers: Sequence[int] | None = None
    heads: Sequence[str] = ()

    def __post_init__(self) -> None:
        for field in ("targets", "exclude", "layers", "heads"):
            value = getattr(self, field)
            if isinstance(value, str) and field != "targets":
                object.__setattr__(self, field, (value,))
            elif isinstance(value, list):
                object.__setattr__(self, field, tuple(value))
        if isinstance(self.targets, str):
            object.__setattr__(self, "targets", (self.targets,))
        if self.layers is not None and any(not isinstance(i, int) or i < 0 for i in self.layers):
            raise ValueError(f"layers must be non-negative integers, got {list(self.layers)!r}")

    # --- the method interface -------------------------------------------------------------
    def default_targets(self, roles: Mapping[str, Any]) -> Sequence[Any]:
        """Targets used when ``targets`` is None (roles, names or types); ``roles`` is the model's profile."""
        raise ValueError(f"{type(self).__name__} needs `targets=`: say which modules it should act on")

    def parameter_targets(self) -> Sequence[str]:
        """Parameters this config adapts directly (e.g. LoRA's ``target_parameters`` on MoE expert stacks), which
        ``"all-linear"``'s warning about unreached parameters leaves out; none by default."""
        return ()

    def accepts(self, module: nn.Module) -> bool:
        """Whether a component of this method can sit on ``module`` (used to filter selections)."""
        return True

    def extra_sites(self, modules: Mapping[str, nn.Module], targets: list[str]) -> dict[str, Component]:
        """Components this method adds outside its targets (e.g. LoRA's ``bias="all"`` bias deltas), keyed by
        module name; ``modules`` are the model's modules that are not heads. Default: none."""
        return {}

    def build(self, module: nn.Module, name: str) -> Component:
        """Create this method's component for the module called ``name``. Parameters are allocated on the
        module's device with its dtype; initialization happens in ``Component.initialize``."""
        raise NotImplementedError

    def build_all(
        self, modules: Mapping[str, nn.Module], targets: list[str], select: Callable[[Sequence[Any]], list[str]]
    ) -> dict[str, Component]:
        """Components for the resolved ``targets`` at once (default: :meth:`build` for each), keyed by module name.

        Override when components share state across sites (VeRA's shared projections), depend on other selectors
        ((IA)^3's ``feedforward``), or when a default selection keeps only the modules the method has work at
        (BitFit: modules with a bias). ``select(selectors)`` resolves selectors against the model the way
        ``targets`` are resolved (raises ``TargetError`` when one matches nothing); ``modules`` are all of the
        model's modules by name."""
        return {n: self.build(modules[n], n) for n in targets}

    def hotswap_fields(self) -> tuple[str, ...]:
        """Fields that may differ between an adapter and one hot-swapped into its place
        (:meth:`Adapters.hotswap`): the components absorb them (e.g. LoRA's ranks and alphas, padded and folded
        into the factors). ``targets`` always may: the sites are compared instead. Default: none."""
        return ()

    def padded(self, r: int, scalings: Mapping[str, float]) -> AdapterConfig:
        """This config after :meth:`Adapters.prepare_hotswap` padded its components to rank ``r`` keeping each
        site's scaling (``scalings``: site -> scaling). Default: unchanged (a method without ranks)."""
        return self

    def parts(self) -> Sequence[AdapterConfig]:
        """The configs this one is made of (a union lists its members; a plain config is its own part)."""
        return (self,)

    def combine(self, name: str, module: nn.Module, components: list[Component]) -> Component:
        """One component for module ``name`` from the components the parts put there (in part order).
        Default: the single component, or a :class:`~adapterkit.component.Chain` applying them in order."""
        if len(components) == 1:
            return components[0]
        from .component import Chain

        return Chain(components)

    # --- serialization --------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"method": self.method, "schema_version": self.schema_version}
        for f in dataclasses.fields(self):
            out[f.name] = _jsonable(getattr(self, f.name))
        return out

    def replace(self, **changes: Any) -> AdapterConfig:
        return dataclasses.replace(self, **changes)


def _jsonable(value: Any) -> Any:
    if isinstance(value, AdapterConfig):
        return value.to_dict()
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, type):
        return f"type:{value.__module__}.{value.__qualname__}"
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


def register(name: str) -> Callable[[type[AdapterConfig]], type[AdapterConfig]]:
    """Class decorator: register a config class under ``name`` (lower case)."""

    def deco(cls: type[AdapterConfig]) -> type[AdapterConfig]:
        key = name.lower()
        if key in _METHODS and _METHODS[key] is not cls:
            raise ValueError(f"method name {name!r} is already registered by {_METHODS[key].__name__}")
        cls.method = key
        _METHODS[key] = cls
        return cls

    return deco


def register_preset(name: str, config: AdapterConfig) -> None:
    """Register a named config instance (a preset), usable wherever a method name is."""
    _PRESETS[name.lower()] = config


def registered() -> dict[str, type[AdapterConfig]]:
    """Registered method names -> config classes."""
    return dict(_METHODS)


def get_config(spec: str | AdapterConfig, **overrides: Any) -> AdapterConfig:
    """Resolve a method name, preset name or config instance to a config instance.

    Raises:
        ValueError: unknown name (with close matches and the list of known names).
    """
    if isinstance(spec, AdapterConfig):
        return dataclasses.replace(spec, **overrides) if overrides else spec
    if not isinstance(spec, str):
        raise TypeError(f"expected a method name or a config object, got {type(spec).__name__}")
    key = spec.lower()
    if key in _PRESETS:
        return dataclasses.replace(_PRESETS[key], **overrides) if overrides else _PRESETS[key]
    if key in _METHODS:
        return _METHODS[key](**overrides)
    known = sorted(set(_METHODS) | set(_PRESETS))
    close = difflib.get_close_matches(key, known, n=3)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise ValueError(f"unknown method {spec!r}{hint} known methods and presets: {', '.join(known)}")


def config_from_dict(data: dict[str, Any]) -> AdapterConfig:
    """Inverse of :meth:`AdapterConfig.to_dict`.

    Raises:
        ValueError: unknown method, newer schema version, or unknown fields.
    """
    data = dict(data)
    method = data.pop("method", None)
    version = data.pop("schema_version", 1)
    if method not in _METHODS:
        raise ValueError(f"unknown method {method!r} in adapter config; known: {', '.join(sorted(_METHODS))}")
    cls = _METHODS[method]
    if version > cls.schema_version:
        raise ValueError(
            f"adapter config has schema version {version} but this adapterkit reads up to "
            f"{cls.schema_version} for {method!r}: upgrade adapterkit"
        )
    migrate = getattr(cls, "migrate", None)
    if migrate is not None:  # older schema versions in this version's terms
        data = migrate(data, version)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ValueError(f"unknown fields for {method!r}: {sorted(unknown)}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            kwargs[f.name] = _from_json(data[f.name])
    return cls(**kwargs)


def _from_json(value: Any) -> Any:
    if isinstance(value, dict) and "method" in value:
        return config_from_dict(value)
    if isinstance(value, str) and value.startswith("type:"):
        import importlib

        mod, _, qual = value[5:].rpartition(".")
        if mod.split(".")[0] not in ("torch", "transformers", "adapterkit"):
            raise ValueError(f"refusing to import module type {value[5:]!r} from a config file")
        return getattr(importlib.import_module(mod), qual)
    if isinstance(value, list):
        return tuple(_from_json(v) for v in value)
    return value
