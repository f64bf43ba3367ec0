"""Data: a byte tokenizer, four deterministic generators and a verified on-disk cache.

Generators (each a frozen, validated config; ``kind`` is its name in YAML ``data:`` sections):

==========  =====================  ==========================================================
kind        config                 what
==========  =====================  ==========================================================
knowledge   :class:`KnowledgeConfig`  fictional biographies + QA; knowledge recall eval, bits
recall      :class:`RecallConfig`     associative recall rows (in-context key-value lookup)
text        :class:`TextConfig`       any text file as bytes, contiguous train/val split
facts       :class:`FactsConfig`      (subject, relation) -> object facts; loss on the answer token
==========  =====================  ==========================================================

``load_dataset(cfg)`` returns a :class:`Dataset` (train/val uint16 token streams, tokenizer,
manifest, extras such as ``dataset.kb``), cached under ``data/cache/<kind>-<hash>/``;
``dataset.sampler(split, B, T, seed)`` gives the deterministic, resumable batch sampler.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from labcore.config import ConfigError, from_dict
from labcore.data.cache import (
    GENERATORS,
    BatchSampler,
    Dataset,
    build_dataset,
    dataset_dir,
    default_cache_dir,
    load_dataset,
    verify_dataset_dir,
)
from labcore.data.facts import FactsConfig
from labcore.data.knowledge import (
    KnowledgeBase,
    KnowledgeConfig,
    RecallResult,
    greedy_generate,
    knowledge_bits,
    knowledge_recall,
    make_knowledge_base,
    unigram_baseline,
)
from labcore.data.recall import RecallConfig, associative_recall_accuracy
from labcore.data.text import TextConfig, sample_path
from labcore.data.tokenizer import ByteTokenizer


def data_config_from_dict(d: Mapping[str, Any]) -> Any:
    """``{"kind": "knowledge", "n_people": 100, ...}`` -> the validated generator config.

    Unknown kinds and unknown keys raise ConfigError naming them. For ``kind: text``, ``sample:
    NAME`` may replace ``path`` to use a shipped sample from ``data/samples``.
    """
    if not isinstance(d, Mapping):
        raise ConfigError(f"data={d!r} is not allowed: must be a mapping with a 'kind' key")
    d = dict(d)
    kind = d.pop("kind", None)
    if kind not in GENERATORS:
        raise ConfigError(f"data.kind={kind!r} is not allowed: must be one of {sorted(GENERATORS)}")
    if kind == "text" and "sample" in d:
        if "path" in d:
            raise ConfigError("data: give either 'path' or 'sample' for kind 'text', not both")
        d["path"] = str(sample_path(d.pop("sample")))
    cls = GENERATORS[kind].config_cls
    try:
        return from_dict(cls, d)
    except TypeError as e:  # e.g. a missing required field
        raise ConfigError(f"data ({kind}): {e}") from None


__all__ = [
    "BatchSampler", "ByteTokenizer", "Dataset", "FactsConfig", "KnowledgeBase", "KnowledgeConfig", "RecallConfig",
    "RecallResult", "TextConfig", "associative_recall_accuracy", "build_dataset", "data_config_from_dict",
    "dataset_dir", "default_cache_dir", "greedy_generate", "knowledge_bits", "knowledge_recall",
    "load_dataset", "make_knowledge_base", "sample_path", "unigram_baseline", "verify_dataset_dir",
]
