"""The YAML run file of ``labcore train``: sections model, plan, data, train -> validated configs.

::

    model: {d_model: 128, n_layers: 8, n_heads: 4, d_ff: 512}      # ModelConfig fields
    plan:  {kind: memory, memory: {type: ultramem, n_keys: 32, ...}, placements: "2:5"}
    data:  {kind: knowledge, ...}                                      # a data config
    train: {steps: 200, lr: 1.0e-3}                                    # TrainConfig fields

Everything is validated here, before any work.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from labcore.config import ConfigError
from labcore.data import data_config_from_dict
from labcore.data.tokenizer import ByteTokenizer
from labcore.lm.model import ModelConfig
from labcore.lm.train.config import TrainConfig

CONFIG_SECTIONS = ("model", "plan", "data", "train")


class YamlLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader, but ``1e-3`` reads as a float (YAML 1.1 makes it a string)."""


YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                |\.[0-9_]+(?:[eE][-+][0-9]+)?
                |[-+]?\.(?:inf|Inf|INF)
                |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def load_run_config(source: str | Path | Mapping[str, Any]) -> tuple[ModelConfig, TrainConfig, Any]:
    """YAML file (or its parsed mapping) with sections model, plan, data, train ->
    (ModelConfig, TrainConfig, data config). Everything is validated here, before any work.

    ``model.vocab_size`` defaults to the byte tokenizer's 259 and ``model.max_seq_len`` to
    ``train.seq_len`` when omitted.
    """
    if isinstance(source, Mapping):
        doc = dict(source)
    else:
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"config={str(path)!r} is not allowed: must be an existing YAML file")
        doc = yaml.load(path.read_text(), Loader=YamlLoader) or {}
    if not isinstance(doc, Mapping):
        raise ConfigError(f"config: the YAML document must be a mapping with sections {CONFIG_SECTIONS}")
    unknown = sorted(set(doc) - set(CONFIG_SECTIONS))
    if unknown:
        raise ConfigError(f"config: unknown section(s) {unknown}; allowed sections: {list(CONFIG_SECTIONS)}")
    for sec in ("model", "data"):
        if not isinstance(doc.get(sec), Mapping):
            raise ConfigError(f"config: section {sec!r} is missing or not a mapping")
    tcfg = TrainConfig.from_dict(doc.get("train") or {})
    dcfg = data_config_from_dict(doc["data"])
    m = dict(doc["model"])
    if "plan" in m and "plan" in doc:
        raise ConfigError("config: give the plan either as section 'plan' or as model.plan, not both")
    if "plan" in doc:
        if not isinstance(doc["plan"], Mapping):
            raise ConfigError("config: section 'plan' must be a mapping (e.g. {kind: dense})")
        m["plan"] = doc["plan"]
    m.setdefault("vocab_size", ByteTokenizer().vocab_size)
    m.setdefault("max_seq_len", tcfg.seq_len)
    mcfg = ModelConfig.from_dict(m)
    return mcfg, tcfg, dcfg
