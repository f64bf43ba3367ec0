"""Synthetic knowledge base: fictional people, their attributes, biographies and questions.

The task measures *knowledge capacity*: how many facts a model stores in its parameters. It is a
small, deterministic version of the biography data of Allen-Zhu & Li ("Physics of Language
Models 3.x"): N fictional individuals, each with A independent attributes drawn uniformly:

    attribute     values                                   log2(values)
    birth_date    28 days x 12 months x 100 years = 33600  15.04
    birth_city    40 cities                                 5.32
    university    30 universities                           4.91
    field         30 fields of study                        4.91
    employer      40 companies (fictional)                  5.32

    knowledge_bits(kb) = N * sum_a log2(|values_a|)          (bits the data set asks a model to store)

so bits/parameter = knowledge_bits(kb) / n_params, and N is the knob for the knowledge load.
Names are made of syllables and unique, so each fact is only recoverable from the name.

Training text (documents are ``BOS text EOS``):
- ``bios_per_person`` biographies per person: one sentence per attribute, each sentence from one
  of the attribute's BIO templates chosen at random, sentences in random order (augmentation makes
  the facts extractable instead of memorised as one string).
- for the first ``round(qa_fraction * N)`` people (the "qa_train" people), one question-answer
  document with a line "Q: <question>\\nA: <value>" per attribute, questions from the TRAIN
  question templates. The remaining people are "qa_heldout".
Validation text: one fresh biography per person (another random template choice/order).

Evaluation (:func:`knowledge_recall`): for each (person, attribute) a prompt and its answer:
- mode "question": ``"Q: " + held-out question + "\\nA: "`` (templates that never occur in the
  training text; tested) -> answer ``value``. On "qa_heldout" people this is the knowledge
  *extraction* test of Allen-Zhu & Li; on "qa_train" people it tests paraphrase robustness.
- mode "bio": the prefix of BIO template 0 up to the value -> memorisation recall.
An answer counts when greedy decoding reproduces every byte of the value. That is checked with one
teacher-forced forward of ``prompt + answer``: greedy decoding emits the answer iff at every
answer position the argmax of the logits is the next answer byte (equal by induction, and one
forward instead of len(answer) decoding steps). Sequences are right-padded, which cannot change
earlier positions of a causal model. The model may be any callable ``model(idx) -> logits`` or an
object with ``.logits`` (an ``LMOutput``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from labcore.config import ConfigError, check_choice, check_float, check_int
from labcore.data.cache import Built, Generator, register
from labcore.data.tokenizer import ByteTokenizer

# ----------------------------------------------------------------------------------------------
# Attribute values.
# ----------------------------------------------------------------------------------------------

MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December")
BIRTH_DATES = tuple(f"{m} {d}, {y}" for y in range(1900, 2000) for m in MONTHS for d in range(1, 29))
CITIES = ("Lisbon", "Oslo", "Nairobi", "Kyoto", "Lima", "Quebec", "Dublin", "Hanoi", "Tunis",
          "Perth", "Bergen", "Porto", "Dakar", "Sapporo", "Cusco", "Halifax", "Galway", "Hue",
          "Sfax", "Darwin", "Tromso", "Braga", "Accra", "Nagoya", "Arequipa", "Regina", "Cork",
          "Da Nang", "Sousse", "Hobart", "Trondheim", "Faro", "Kumasi", "Osaka", "Trujillo",
          "Moncton", "Limerick", "Haiphong", "Bizerte", "Cairns")
UNIVERSITIES = tuple(f"{p} {k}" for p, k in [
    ("Northwood", "University"), ("Eastbrook", "College"), ("Silverlake", "Institute"),
    ("Redfield", "University"), ("Ashgrove", "College"), ("Stonebridge", "Institute"),
    ("Westmere", "University"), ("Clearwater", "College"), ("Highcliff", "Institute"),
    ("Maplewood", "University"), ("Larkspur", "College"), ("Ironvale", "Institute"),
    ("Brightwater", "University"), ("Oakhurst", "College"), ("Fernhill", "Institute"),
    ("Goldcrest", "University"), ("Riverside", "College"), ("Pinecrest", "Institute"),
    ("Amberley", "University"), ("Coldharbour", "College"), ("Elmstead", "Institute"),
    ("Kingsbury", "University"), ("Moorfield", "College"), ("Thornbury", "Institute"),
    ("Wyndham", "University"), ("Hollowell", "College"), ("Fairhaven", "Institute"),
    ("Greystone", "University"), ("Lindow", "College"), ("Marston", "Institute")])
FIELDS = ("mathematics", "chemistry", "linguistics", "architecture", "economics", "astronomy",
          "philosophy", "geology", "music theory", "biology", "history", "statistics",
          "mechanical engineering", "law", "medicine", "botany", "oceanography", "sociology",
          "computer science", "physics", "art history", "nursing", "journalism", "agronomy",
          "psychology", "anthropology", "ecology", "civil engineering", "pharmacy", "theology")
EMPLOYERS = tuple(f"{a} {b}" for a, b in [
    ("Velora", "Systems"), ("Quintex", "Labs"), ("Harbin", "Foods"), ("Corvid", "Analytics"),
    ("Lumen", "Textiles"), ("Brava", "Shipping"), ("Ostrand", "Energy"), ("Pellucid", "Media"),
    ("Tamsin", "Robotics"), ("Ardent", "Pharma"), ("Nimbus", "Airways"), ("Kestrel", "Bank"),
    ("Solace", "Insurance"), ("Graven", "Steel"), ("Mirelle", "Cosmetics"), ("Halcyon", "Hotels"),
    ("Zephyr", "Motors"), ("Orrin", "Publishing"), ("Calder", "Mining"), ("Fennick", "Toys"),
    ("Rowan", "Logistics"), ("Tessaly", "Software"), ("Brindle", "Bakeries"), ("Umber", "Paints"),
    ("Castellan", "Security"), ("Winslow", "Optics"), ("Maren", "Fisheries"), ("Idris", "Telecom"),
    ("Sorrel", "Farms"), ("Quill", "Stationery"), ("Tavish", "Breweries"), ("Elstree", "Studios"),
    ("Pavane", "Instruments"), ("Caspian", "Chemicals"), ("Larch", "Furniture"), ("Vesper", "Clocks"),
    ("Dunmore", "Construction"), ("Alder", "Health"), ("Osric", "Games"), ("Juniper", "Foods")])

VALUES: dict[str, tuple[str, ...]] = {
    "birth_date": BIRTH_DATES, "birth_city": CITIES, "university": UNIVERSITIES, "field": FIELDS,
    "employer": EMPLOYERS,
}
ATTRIBUTES: tuple[str, ...] = tuple(VALUES)

# ----------------------------------------------------------------------------------------------
# Templates. Every BIO template ends with "{value}." so its prefix is a recall prompt.
# QUESTION templates: the first N_TRAIN_QUESTIONS per attribute appear in training QA documents;
# the others are held out for evaluation and share no wording with any training template.
# ----------------------------------------------------------------------------------------------

BIO_TEMPLATES: dict[str, tuple[str, ...]] = {
    "birth_date": ("{name} was born on {value}.", "{name} came into this world on {value}.",
                   "The birthday of {name} is {value}.", "{name} celebrates a birthday on {value}."),
    "birth_city": ("{name} was born in {value}.", "{name} spent early childhood in {value}.",
                   "The hometown of {name} is {value}.", "{name} grew up in the city of {value}."),
    "university": ("{name} graduated from {value}.", "{name} studied at {value}.",
                   "The alma mater of {name} is {value}.", "{name} earned a degree at {value}."),
    "field": ("{name} majored in {value}.", "{name} wrote a thesis in {value}.",
              "The academic field of {name} is {value}.", "{name} trained as a specialist in {value}."),
    "employer": ("{name} works for {value}.", "{name} is employed by {value}.",
                 "The current employer of {name} is {value}.", "{name} draws a salary from {value}."),
}
QUESTION_TEMPLATES: dict[str, tuple[str, ...]] = {
    "birth_date": ("When was {name} born?", "What is the birth date of {name}?",
                   "On which day did {name} enter life?", "Tell me the date {name} arrived on Earth."),
    "birth_city": ("Where was {name} born?", "Which city is the birthplace of {name}?",
                   "In what town did {name} first open their eyes?", "Name the place {name} hails from."),
    "university": ("Which university did {name} attend?", "Where did {name} get a degree?",
                   "What school awarded {name} a diploma?", "Name the institution {name} graduated from."),
    "field": ("What did {name} study?", "What was the major of {name}?",
              "Which discipline did {name} pursue in school?", "Name the subject {name} specialised in."),
    "employer": ("Who employs {name}?", "Which company does {name} work for?",
                 "What firm pays the wages of {name}?", "Name the organisation {name} is on the payroll of."),
}
N_TRAIN_QUESTIONS = 2
QA_PREFIX, QA_SEP = "Q: ", "\nA: "

SYLLABLES = ("ba", "ce", "di", "fo", "gu", "ha", "ke", "li", "mo", "nu", "pa", "re", "si", "to",
             "vu", "wa", "ye", "za", "bri", "cla", "dro", "fen", "gar", "hol", "jin", "kor", "lun",
             "mar", "nel", "pra", "quo", "ros", "sten", "tal", "vor", "wen")


def value_count(attribute: str) -> int:
    return len(VALUES[attribute])


# ----------------------------------------------------------------------------------------------
# Config and the knowledge base.
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KnowledgeConfig:
    """n_people: individuals (the knowledge-load knob); bios_per_person: augmented biographies
    per person in the training text; qa_fraction: share of people whose train-template QA lines
    are in the training text; attributes: which attributes exist; seed: everything random."""

    n_people: int = 200
    bios_per_person: int = 4
    qa_fraction: float = 0.5
    attributes: tuple[str, ...] = ATTRIBUTES
    seed: int = 0

    def __post_init__(self) -> None:
        o = "KnowledgeConfig"
        check_int(o, "n_people", self.n_people, min_value=1, max_value=200_000)
        check_int(o, "bios_per_person", self.bios_per_person, min_value=1, max_value=1000)
        check_float(o, "qa_fraction", self.qa_fraction, min_value=0.0, max_value=1.0)
        check_int(o, "seed", self.seed, min_value=0)
        if isinstance(self.attributes, list):
            object.__setattr__(self, "attributes", tuple(self.attributes))
        if not isinstance(self.attributes, tuple) or not self.attributes:
            raise ConfigError(f"{o}.attributes={self.attributes!r} is not allowed: must be a non-empty "
                              f"tuple of {ATTRIBUTES}")
        for a in self.attributes:
            check_choice(o, "attributes", a, ATTRIBUTES)
        if len(set(self.attributes)) != len(self.attributes):
            raise ConfigError(f"{o}.attributes={self.attributes!r} is not allowed: must not repeat")


@dataclass(frozen=True)
class KnowledgeBase:
    """The facts: ``people[i] = {"name": str, <attribute>: value, ...}``; ``n_qa_train`` people
    (the first ones) have training QA documents."""

    config: KnowledgeConfig
    people: tuple[dict[str, str], ...]
    n_qa_train: int

    @property
    def attributes(self) -> tuple[str, ...]:
        return self.config.attributes

    def to_json(self) -> str:
        return json.dumps({"config": {**self.config.__dict__, "attributes": list(self.attributes)},
                           "n_qa_train": self.n_qa_train, "people": list(self.people)},
                          sort_keys=True, indent=0) + "\n"

    @classmethod
    def from_json(cls, text: str) -> KnowledgeBase:
        d = json.loads(text)
        cfg = d["config"]
        return cls(KnowledgeConfig(**{**cfg, "attributes": tuple(cfg["attributes"])}),
                   tuple(d["people"]), d["n_qa_train"])


def knowledge_bits(kb: KnowledgeBase | KnowledgeConfig) -> float:
    """Bits of knowledge in the data set: N * sum over attributes of log2(number of values)."""
    cfg = kb.config if isinstance(kb, KnowledgeBase) else kb
    return cfg.n_people * sum(math.log2(value_count(a)) for a in cfg.attributes)


def make_names(n: int, rng: np.random.Generator) -> list[str]:
    """n unique "First Last" names from syllables (2 for the first name, 3 for the last)."""
    names: list[str] = []
    seen: set[str] = set()
    S = len(SYLLABLES)
    while len(names) < n:
        k = rng.integers(0, S, size=(n, 5))
        for row in k:
            first = "".join(SYLLABLES[i] for i in row[:2]).capitalize()
            last = "".join(SYLLABLES[i] for i in row[2:]).capitalize()
            name = f"{first} {last}"
            if name not in seen:
                seen.add(name)
                names.append(name)
                if len(names) == n:
                    break
    return names


def make_knowledge_base(cfg: KnowledgeConfig) -> KnowledgeBase:
    rng = np.random.default_rng([cfg.seed, 0])
    names = make_names(cfg.n_people, rng)
    people = []
    for name in names:
        person = {"name": name}
        for a in cfg.attributes:
            person[a] = VALUES[a][int(rng.integers(0, value_count(a)))]
        people.append(person)
    return KnowledgeBase(cfg, tuple(people), int(round(cfg.qa_fraction * cfg.n_people)))


# ----------------------------------------------------------------------------------------------
# Rendering.
# ----------------------------------------------------------------------------------------------


def render_bio(person: dict[str, str], attributes: Sequence[str], rng: np.random.Generator) -> str:
    """One biography: a sentence per attribute, random templates, random sentence order."""
    order = rng.permutation(len(attributes))
    sentences = []
    for j in order:
        a = attributes[int(j)]
        t = BIO_TEMPLATES[a][int(rng.integers(0, len(BIO_TEMPLATES[a])))]
        sentences.append(t.format(name=person["name"], value=person[a]))
    return " ".join(sentences)


def render_qa(person: dict[str, str], attributes: Sequence[str], rng: np.random.Generator) -> str:
    """One QA document with the TRAIN question templates: "Q: ...\\nA: value" lines."""
    lines = []
    for a in attributes:
        t = QUESTION_TEMPLATES[a][int(rng.integers(0, N_TRAIN_QUESTIONS))]
        lines.append(QA_PREFIX + t.format(name=person["name"]) + QA_SEP + person[a])
    return "\n".join(lines)


def training_documents(kb: KnowledgeBase) -> list[str]:
    rng = np.random.default_rng([kb.config.seed, 1])
    docs = []
    for i, p in enumerate(kb.people):
        docs.extend(render_bio(p, kb.attributes, rng) for _ in range(kb.config.bios_per_person))
        if i < kb.n_qa_train:
            docs.append(render_qa(p, kb.attributes, rng))
    order = rng.permutation(len(docs))  # interleave people so every window mixes individuals
    return [docs[int(i)] for i in order]


def validation_documents(kb: KnowledgeBase) -> list[str]:
    rng = np.random.default_rng([kb.config.seed, 2])
    return [render_bio(p, kb.attributes, rng) for p in kb.people]


def encode_documents(docs: Sequence[str], tok: ByteTokenizer) -> np.ndarray:
    ids: list[int] = []
    for d in docs:
        ids.extend(tok.encode(d, bos=True, eos=True))
    return np.asarray(ids, dtype=np.uint16)


def _build(cfg: KnowledgeConfig, tok: ByteTokenizer) -> Built:
    kb = make_knowledge_base(cfg)
    return Built(encode_documents(training_documents(kb), tok), encode_documents(validation_documents(kb), tok),
                 None, {"kb.json": kb.to_json().encode()})


register(Generator("knowledge", KnowledgeConfig, _build,
                   lambda cfg, files: {"kb": KnowledgeBase.from_json(files["kb.json"].decode())}))

# ----------------------------------------------------------------------------------------------
# Evaluation.
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RecallItem:
    person: int
    attribute: str
    prompt: str
    answer: str


def recall_items(kb: KnowledgeBase, mode: str = "question", people: str | Sequence[int] = "all",
                 template: int | None = None) -> list[RecallItem]:
    """The (prompt, answer) pairs of an evaluation.

    mode: "question" (held-out question templates; ``template`` picks one of them, default: the
    held-out templates in turn per person) or "bio" (prefix of BIO template ``template``, default 0).
    people: "all", "qa_train", "qa_heldout" or a list of person indices.
    """
    check_choice("knowledge_recall", "mode", mode, ("question", "bio"))
    if isinstance(people, str):
        check_choice("knowledge_recall", "people", people, ("all", "qa_train", "qa_heldout"))
        idx = {"all": range(len(kb.people)), "qa_train": range(kb.n_qa_train),
               "qa_heldout": range(kb.n_qa_train, len(kb.people))}[people]
    else:
        idx = [int(i) for i in people]
        bad = [i for i in idx if not 0 <= i < len(kb.people)]
        if bad:
            raise ValueError(f"knowledge_recall: people={bad[:5]} out of range [0, {len(kb.people)})")
    items = []
    for i in idx:
        p = kb.people[i]
        for a in kb.attributes:
            if mode == "question":
                held = QUESTION_TEMPLATES[a][N_TRAIN_QUESTIONS:]
                t = held[(i if template is None else template) % len(held)]
                prompt = QA_PREFIX + t.format(name=p["name"]) + QA_SEP
            else:
                t = BIO_TEMPLATES[a][0 if template is None else template % len(BIO_TEMPLATES[a])]
                prompt = t[: t.index("{value}")].format(name=p["name"])
            items.append(RecallItem(i, a, prompt, p[a]))
    return items


def _logits(model: Callable[..., Any], idx: torch.Tensor) -> torch.Tensor:
    out = model(idx)
    return out.logits if hasattr(out, "logits") else out


@torch.no_grad()
def answers_correct(model: Callable[..., Any], prompts: Sequence[str], answers: Sequence[str],
                    tok: ByteTokenizer | None = None, *, batch_size: int = 64,
                    device: torch.device | str | None = None) -> list[bool]:
    """For each (prompt, answer): does greedy decoding after ``BOS prompt`` emit ``answer``?

    One teacher-forced forward per batch: correct iff argmax(logits[t]) == answer[t'] at every
    answer position (see the module docstring). Right padding with PAD keeps it causal-exact.
    """
    tok = tok or ByteTokenizer()
    if device is None:
        p = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
        device = p.device if p is not None else "cpu"
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    out: list[bool] = []
    try:
        for s in range(0, len(prompts), batch_size):
            pr = [tok.encode(q, bos=True) for q in prompts[s: s + batch_size]]
            an = [tok.encode(a) for a in answers[s: s + batch_size]]
            seqs = [p + a for p, a in zip(pr, an)]
            L = max(len(q) for q in seqs)
            idx = torch.full((len(seqs), L), tok.pad_id, dtype=torch.long)  # (B, L) right-padded
            for r, q in enumerate(seqs):
                idx[r, : len(q)] = torch.tensor(q)
            pred = _logits(model, idx.to(device)).argmax(-1).cpu()  # (B, L)
            for r, (p, a) in enumerate(zip(pr, an)):
                # logits at position t predict token t+1: answer tokens sit at len(p) .. len(p)+len(a)-1
                got = pred[r, len(p) - 1: len(p) - 1 + len(a)]
                out.append(bool(torch.equal(got, torch.tensor(a))))
    finally:
        if was_training and hasattr(model, "train"):
            model.train()
    return out


@torch.no_grad()
def greedy_generate(model: Callable[..., Any], prompt: str, max_new_tokens: int,
                    tok: ByteTokenizer | None = None, device: torch.device | str = "cpu",
                    stop_at: str | None = None) -> str:
    """Plain greedy decoding (one full forward per new token; slow, obviously correct)."""
    tok = tok or ByteTokenizer()
    ids = tok.encode(prompt, bos=True)
    new: list[int] = []
    for _ in range(max_new_tokens):
        logits = _logits(model, torch.tensor([ids + new], device=device))
        nxt = int(logits[0, -1].argmax())
        if nxt == tok.eos_id:
            break
        new.append(nxt)
        if stop_at is not None and tok.decode(new).endswith(stop_at):
            break
    return tok.decode(new)


@dataclass(frozen=True)
class RecallResult:
    """Exact-match recall: ``per_attribute[a]`` accuracy over the people evaluated, ``overall``
    the mean over all (person, attribute) items, ``n_items`` how many there were."""

    per_attribute: dict[str, float]
    overall: float
    n_items: int
    mode: str

    def as_metrics(self, prefix: str) -> dict[str, float]:
        return {f"{prefix}": self.overall, **{f"{prefix}/{a}": v for a, v in self.per_attribute.items()}}


def knowledge_recall(model: Callable[..., Any], kb: KnowledgeBase, *, mode: str = "question",
                     people: str | Sequence[int] = "all", max_people: int | None = None,
                     template: int | None = None, batch_size: int = 64,
                     device: torch.device | str | None = None) -> RecallResult:
    """Exact-match recall per attribute by greedy decoding (see module docstring).

    ``max_people`` keeps the first that many of the selected people (evaluation cost control).
    """
    if max_people is not None:
        check_int("knowledge_recall", "max_people", max_people, min_value=1)
    items = recall_items(kb, mode, people, template)
    if max_people is not None:
        keep = sorted({it.person for it in items})[:max_people]
        items = [it for it in items if it.person in set(keep)]
    if not items:
        raise ValueError(f"knowledge_recall: people={people!r} selects nobody in this knowledge base "
                         f"(n_people={len(kb.people)}, n_qa_train={kb.n_qa_train})")
    ok = answers_correct(model, [it.prompt for it in items], [it.answer for it in items],
                         batch_size=batch_size, device=device)
    per: dict[str, list[bool]] = {a: [] for a in kb.attributes}
    for it, c in zip(items, ok):
        per[it.attribute].append(c)
    return RecallResult({a: float(np.mean(v)) for a, v in per.items()}, float(np.mean(ok)), len(ok), mode)


def unigram_baseline(train: np.ndarray, val: np.ndarray, vocab_size: int = 259) -> dict[str, float]:
    """Loss (nats/token) and next-token accuracy of predicting every val token from the train
    unigram frequencies (add-one smoothed): the floor any trained model must beat."""
    counts = np.bincount(np.asarray(train, dtype=np.int64), minlength=vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    v = np.asarray(val, dtype=np.int64)
    # the first token of the stream is never a target; match the LM's (x, y) shift
    y = v[1:]
    return {"loss": float(-logp[y].mean()), "accuracy": float((y == int(np.argmax(counts))).mean())}
