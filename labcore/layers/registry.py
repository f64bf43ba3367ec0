"""One registry of labcore's sparse layers: what the rest of the package needs to know about each.

A layer file declares itself once, at its end::

    register(LayerSpec(name="pkm", role="memory", config=PKMConfig, layer=PKM,
                       label="PKM", color="#2ca02c", size_field="n_keys",
                       min_size=lambda cfg_kwargs: cfg_kwargs.get("top_k", 32)))

and everything that used to name PKM or UltraMem (the sparse-layer plan of the LM, YAML and notebook
parameters, budget matchers, benchmarks, figures, experiments) iterates :data:`LAYERS` or looks a
spec up with :func:`spec_for` / :func:`get`. Adding a variant is then one layer file (with its
``register`` call), its test and, if needed, a doc page.

Roles
-----
``"ffn"``
    replaces the FFN of a block (dense SwiGLU, MoE).
``"memory"``
    a memory layer wired into the residual stream by the LM's sparse-layer plan (placements
    ``"k:v"``, optionally one value pool shared across layers); built as ``layer(cfg, values=pool)``.

``size_field`` names the integer config field that sets the layer's parameter count (``n_keys`` for
product-key memories, ``n_experts`` for MoE); budget matchers solve for it. ``min_size`` returns its
smallest allowed value for the other config fields given as a dict (``d_model`` included).

Memories may also say how the equal-budget family sizes them (``labcore.lm.budget``):
``family_kwargs(D)`` gives the config fields used at model width D (a memory without it is left out
of the default family, of the benchmarks' default model lists and of the architecture notebook, and
can still be named there), and ``layout(L)`` the number of memories and their span for an L-block
model (None: one memory beside the middle block's FFN).
``value_read(layer, aux)`` lets the inference benchmark replay one forward's value read and the
gather inside it (None: those columns stay empty).

The registration order is the order of tables, figure legends and the equal-budget family:
``labcore.layers`` imports ffn ("dense"), moe, pkm, ultramem, ultramem_v2, memory_plus, peer.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from labcore.config import ConfigError

ROLES = ("ffn", "memory")


@dataclass(frozen=True)
class LayerSpec:
    """Everything outside a layer file needs to know about one layer."""

    name: str                                   # short id used in YAML ({"type": name}), tables, CLI
    role: Literal["ffn", "memory"]
    config: type                                # its frozen config dataclass
    layer: type                                 # the nn.Module, built as layer(cfg, **kwargs)
    label: str                                  # human-readable name in figures and tables
    color: str                                  # plot colour (hex), one per layer across all figures
    size_field: str | None = None               # config field a budget matcher solves for
    min_size: Callable[[Mapping[str, Any]], int] | None = None   # smallest size_field for those kwargs
    summary: str = ""                           # one line: the mechanism
    family_kwargs: Callable[[int], Mapping[str, Any]] | None = None   # D -> config fields in the family
    layout: Callable[[int], tuple[int, int]] | None = None   # L -> (memories, span) when none are given
    value_read: Callable[[Any, Any], tuple[Callable[[], Any], Callable[[], Any]]] | None = None
    shares_values: bool = True                  # memory: can read a value pool shared across layers

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.isidentifier() or self.name != self.name.lower():
            raise ConfigError(f"LayerSpec.name={self.name!r} is not allowed: must be a lower-case identifier")
        if self.role not in ROLES:
            raise ConfigError(f"LayerSpec.role={self.role!r} is not allowed: must be one of {ROLES}")
        if not isinstance(self.config, type) or not isinstance(self.layer, type):
            raise ConfigError(f"LayerSpec({self.name!r}): config={self.config!r} and layer={self.layer!r} are "
                              f"not allowed: must be classes (the config dataclass, the nn.Module)")
        if self.size_field is not None and self.size_field not in getattr(self.config, "__dataclass_fields__", {}):
            raise ConfigError(f"LayerSpec({self.name!r}).size_field={self.size_field!r} is not allowed: must be "
                              f"a field of {self.config.__name__}")


LAYERS: dict[str, LayerSpec] = {}


def register(spec: LayerSpec) -> LayerSpec:
    """Add ``spec`` to :data:`LAYERS` (a name or config class may be registered once)."""
    if spec.name in LAYERS and LAYERS[spec.name] != spec:
        raise ConfigError(f"register: name {spec.name!r} is already registered for "
                          f"{LAYERS[spec.name].config.__name__}")
    for other in LAYERS.values():
        if other.config is spec.config and other.name != spec.name:
            raise ConfigError(f"register: config {spec.config.__name__} is already registered as {other.name!r}")
    LAYERS[spec.name] = spec
    return spec


def unregister(name: str) -> LayerSpec:
    """Remove and return the spec registered as ``name`` (tests and notebooks that add a variant)."""
    spec = get(name)
    del LAYERS[name]
    return spec


def get(name: str) -> LayerSpec:
    """The spec registered as ``name``; ConfigError listing the registered names otherwise."""
    try:
        return LAYERS[name]
    except (KeyError, TypeError):
        raise ConfigError(f"layer name {name!r} is not allowed: must be one of {sorted(LAYERS)}") from None


def spec_for(cfg: Any) -> LayerSpec:
    """The spec whose config class ``cfg`` is an instance of."""
    for spec in LAYERS.values():
        if type(cfg) is spec.config:
            return spec
    raise ConfigError(f"config of type {type(cfg).__name__} is not allowed: must be one of "
                      f"{[s.config.__name__ for s in LAYERS.values()]}")


def specs(role: str | None = None) -> tuple[LayerSpec, ...]:
    """Registered specs, in registration order, optionally of one role ("ffn" or "memory")."""
    if role is not None and role not in ROLES:
        raise ConfigError(f"role={role!r} is not allowed: must be None or one of {ROLES}")
    return tuple(s for s in LAYERS.values() if role is None or s.role == role)


def names(role: str | None = None) -> tuple[str, ...]:
    """Registered names, in registration order, optionally of one role."""
    return tuple(s.name for s in specs(role))


def memory_spec(cfg_or_name: Any, owner: str = "memory") -> LayerSpec:
    """The spec of a memory config (or registered name); ConfigError naming ``owner`` when it is not
    a registered memory (e.g. an FFN config, or an unregistered class)."""
    registered = names("memory")
    by_name = cfg_or_name is None or isinstance(cfg_or_name, str)
    spec = LAYERS.get(cfg_or_name) if by_name else next(
        (s for s in LAYERS.values() if type(cfg_or_name) is s.config), None)
    if spec is None or spec.role != "memory":
        shown = cfg_or_name if by_name else type(cfg_or_name).__name__
        raise ConfigError(f"{owner}={shown!r} is not allowed: must be a registered memory layer (one of "
                          f"{list(registered)}, configs {[get(n).config.__name__ for n in registered]})")
    return spec


def build(cfg: Any, **kwargs: Any):
    """The layer for a config (``kwargs``, e.g. ``values=`` for memories, go to its constructor)."""
    return spec_for(cfg).layer(cfg, **kwargs)
