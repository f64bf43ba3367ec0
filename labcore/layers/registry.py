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
smallest allowed value for the other config fields given as a dict.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from labcore.layers.base import ConfigError

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

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.isidentifier() or self.name != self.name.lower():
            raise ConfigError(f"LayerSpec.name={self.name!r} is not allowed: must be a lower-case identifier")
        if self.role not in ROLES:
            raise ConfigError(f"LayerSpec.role={self.role!r} is not allowed: must be one of {ROLES}")


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


def names(role: str | None = None) -> tuple[str, ...]:
    """Registered names, in registration order, optionally of one role."""
    return tuple(n for n, s in LAYERS.items() if role is None or s.role == role)


def build(cfg: Any, **kwargs: Any):
    """The layer for a config (``kwargs``, e.g. ``values=`` for memories, go to its constructor)."""
    return spec_for(cfg).layer(cfg, **kwargs)
