"""Built-in reward scorers, combined as a weighted sum and served by the reward kit.

A scorer spec is a dict from the config's `scorers` list:

    {"kind": "exact_match", "weight": 1.0, "name": "correct", ...options of that kind}

Kinds: `exact_match` (answer vs `metadata[key]`), `numeric` (exact_match with a numeric tolerance),
`regex` (format reward), `length` (penalty past a target length) and `classifier` (a transformers
sequence-classification reward model from a local path). Every scorer is batched:
`score_batch(samples) -> list[float | Exception]`, an Exception being that item's explicit error.
The weighted sum returns `(total, {component name: unweighted value})` per item.

Pure Python (no grpc); torch and transformers are imported only when a classifier is built.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import threading
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from protege.errors import InvalidArgument

logger = logging.getLogger(__name__)

DEFAULT_STOPS = ("\n", "<eos>", "</s>", "<|endoftext|>", "<|im_end|>", "<|eot_id|>")
Value = float | Exception


class ScorerError(Exception):
    """One component of a weighted sum failed on an item."""


class SampleLike(Protocol):
    """What a scorer reads from a sample (protege.reward.RewardSample has these)."""

    id: str
    prompt: str
    completion: str
    metadata: Mapping[str, Any]


# ------------------------------------------------------------------------------- helpers


def extract_answer(completion: str, stops: Sequence[str] = DEFAULT_STOPS,
                   pattern: re.Pattern | None = None) -> str | None:
    """The answer in a completion: the pattern's first group (or match), else the text before the
    first stop string (after leading whitespace). None when the pattern does not match."""
    if pattern is not None:
        m = pattern.search(completion)
        if m is None:
            return None
        return (m.group(1) if m.groups() else m.group(0)).strip()
    text = completion.lstrip()
    for stop in stops:
        if stop:
            text = text.split(stop, 1)[0]
    return text.strip()


def parse_number(text: str) -> float | None:
    """'1,234.5' -> 1234.5; None when the text is not a number."""
    try:
        value = float(text.replace(",", "").replace("_", "").strip())
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _conforms(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_conforms(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is tuple:
        return isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)
    return isinstance(value, tp)


def _check_types(obj: Any, kind: str) -> None:
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if not _conforms(value, hints[f.name]):
            raise InvalidArgument(f"scorer {kind!r}: option {f.name}={value!r} should be of type "
                                  f"{hints[f.name]}")


def _compile(pattern: str, ignore_case: bool, kind: str) -> re.Pattern:
    try:
        return re.compile(pattern, re.IGNORECASE if ignore_case else 0)
    except re.error as e:
        raise InvalidArgument(f"scorer {kind!r}: bad regex {pattern!r}: {e}") from e


# ------------------------------------------------------------------------------- scorers


@dataclasses.dataclass(frozen=True)
class ExactMatch:
    """1 if the completion's answer equals metadata[key] (numerically, within tolerance, if
    numeric), else 0. Range [0, 1]."""

    key: str = "answer"
    numeric: bool = False
    tolerance: float = 1e-6
    answer_pattern: str | None = None
    stop: tuple[str, ...] = DEFAULT_STOPS
    ignore_case: bool = False

    def __post_init__(self) -> None:
        _check_types(self, "exact_match")
        object.__setattr__(self, "stop", tuple(self.stop))
        if self.tolerance < 0:
            raise InvalidArgument(f"exact_match: tolerance must be >= 0, got {self.tolerance}")
        if self.answer_pattern is not None:
            _compile(self.answer_pattern, False, "exact_match")

    def build(self, device: str, dtype: str) -> ExactMatch:
        return self

    def score_batch(self, samples: Sequence[SampleLike]) -> list[Value]:
        pattern = None if self.answer_pattern is None else re.compile(self.answer_pattern)
        return [self._one(s, pattern) for s in samples]

    def _one(self, sample: SampleLike, pattern: re.Pattern | None) -> Value:
        if self.key not in sample.metadata:
            return InvalidArgument(f"metadata has no {self.key!r} (keys: "
                                   f"{sorted(sample.metadata)}); set the scorer's key option")
        expected = str(sample.metadata[self.key]).strip()
        got = extract_answer(sample.completion, self.stop, pattern)
        if got is None:
            return 0.0
        if not self.numeric:
            if self.ignore_case:
                got, expected = got.lower(), expected.lower()
            return float(got == expected)
        target = parse_number(expected)
        if target is None:
            return InvalidArgument(f"metadata[{self.key!r}] = {expected!r} is not a number")
        value = parse_number(got)
        return float(value is not None and abs(value - target) <= self.tolerance)


@dataclasses.dataclass(frozen=True)
class Numeric(ExactMatch):
    """1 if the completion's number is within `tolerance` of metadata[key], else 0."""

    numeric: bool = True


@dataclasses.dataclass(frozen=True)
class RegexMatch:
    """match_score if `pattern` matches the field (mode search/fullmatch/match), else miss_score."""

    pattern: str = ""
    mode: str = "search"
    field: str = "completion"
    ignore_case: bool = False
    match_score: float = 1.0
    miss_score: float = 0.0

    def __post_init__(self) -> None:
        _check_types(self, "regex")
        if not self.pattern:
            raise InvalidArgument("regex: the 'pattern' option is required")
        if self.mode not in ("search", "fullmatch", "match"):
            raise InvalidArgument(
                f"regex: mode must be search, fullmatch or match, got {self.mode!r}")
        if self.field not in ("completion", "prompt"):
            raise InvalidArgument(f"regex: field must be completion or prompt, got {self.field!r}")
        _compile(self.pattern, self.ignore_case, "regex")

    def build(self, device: str, dtype: str) -> RegexMatch:
        return self

    def score_batch(self, samples: Sequence[SampleLike]) -> list[Value]:
        test = getattr(_compile(self.pattern, self.ignore_case, "regex"), self.mode)
        return [self.match_score if test(getattr(s, self.field)) else self.miss_score
                for s in samples]


@dataclasses.dataclass(frozen=True)
class LengthPenalty:
    """-coef * max(0, length - target), length in chars or words. Range (-inf, 0]."""

    target: int = 256
    coef: float = 0.01
    unit: str = "chars"

    def __post_init__(self) -> None:
        _check_types(self, "length")
        if self.unit not in ("chars", "words"):
            raise InvalidArgument(f"length: unit must be chars or words, got {self.unit!r}")
        if self.target < 0 or self.coef < 0:
            raise InvalidArgument("length: target and coef must be >= 0")

    def build(self, device: str, dtype: str) -> LengthPenalty:
        return self

    def score_batch(self, samples: Sequence[SampleLike]) -> list[Value]:
        size = (lambda t: len(t)) if self.unit == "chars" else (lambda t: len(t.split()))
        return [-self.coef * max(0, size(s.completion) - self.target) for s in samples]


@dataclasses.dataclass(frozen=True)
class ClassifierOptions:
    """A sequence-classification reward model: the logit of `label` (or its single output)."""

    path: str = ""
    label: int | str | None = None
    input: str = "prompt+completion"
    batch_size: int = 16
    max_length: int = 1024
    device: str | None = None
    dtype: str | None = None

    def __post_init__(self) -> None:
        _check_types(self, "classifier")
        if not self.path:
            raise InvalidArgument("classifier: the 'path' option (a local model directory) is "
                                  "required")
        if self.input not in ("prompt+completion", "completion", "pair"):
            raise InvalidArgument(f"classifier: input must be prompt+completion, completion or "
                                  f"pair, got {self.input!r}")
        if self.batch_size < 1 or self.max_length < 1:
            raise InvalidArgument("classifier: batch_size and max_length must be >= 1")

    def build(self, device: str, dtype: str) -> ClassifierScorer:
        return ClassifierScorer(self, self.device or device, self.dtype or dtype)


class ClassifierScorer:
    """AutoModelForSequenceClassification + its tokenizer, right-padded batches, no grad."""

    def __init__(self, opts: ClassifierOptions, device: str, dtype: str):
        from protege.services.common.models import (
            check_model_dir,
            load_tokenizer,
            parse_device,
            parse_dtype,
        )
        from transformers import AutoModelForSequenceClassification

        path = str(check_model_dir(opts.path))
        self.opts = opts
        self.device = parse_device(device)
        self.model = AutoModelForSequenceClassification.from_pretrained(
            path, dtype=parse_dtype(dtype), local_files_only=True).to(self.device).eval()
        self.tokenizer = load_tokenizer(path)
        # Right padding keeps every token at its natural position for any architecture.
        self.tokenizer.padding_side = "right"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.label = self._label_index(opts.label)
        self._lock = threading.Lock()  # one forward at a time across the kit's worker threads

    def _label_index(self, label: int | str | None) -> int:
        n = int(self.model.config.num_labels)
        names = dict(self.model.config.label2id or {})
        if label is None:
            if n != 1:
                raise InvalidArgument(f"classifier: the model has {n} labels {sorted(names)}; set "
                                      "the 'label' option to a label name or index")
            return 0
        if isinstance(label, str):
            if label not in names:
                raise InvalidArgument(f"classifier: unknown label {label!r}; labels: "
                                      f"{sorted(names)}")
            return int(names[label])
        if not 0 <= label < n:
            raise InvalidArgument(f"classifier: label index {label} is outside [0, {n})")
        return label

    def _encode(self, samples: Sequence[SampleLike]) -> Any:
        kw = {"padding": True, "truncation": True, "max_length": self.opts.max_length,
              "return_tensors": "pt"}
        if self.opts.input == "pair":
            return self.tokenizer([s.prompt for s in samples], [s.completion for s in samples],
                                  **kw)
        texts = [s.completion if self.opts.input == "completion" else s.prompt + s.completion
                 for s in samples]
        return self.tokenizer(texts, **kw)

    def score_batch(self, samples: Sequence[SampleLike]) -> list[Value]:
        import torch

        out: list[Value] = []
        size = self.opts.batch_size
        with self._lock, torch.inference_mode():
            for i in range(0, len(samples), size):
                batch = self._encode(samples[i:i + size]).to(self.device)
                logits = self.model(**batch).logits.float()
                out.extend(logits[:, self.label].tolist())
        return out


KINDS: dict[str, type] = {"exact_match": ExactMatch, "numeric": Numeric, "regex": RegexMatch,
                          "length": LengthPenalty, "classifier": ClassifierOptions}


# --------------------------------------------------------------------------- weighted sum


@dataclasses.dataclass(frozen=True)
class Component:
    """One parsed spec: its name in `components`, its weight and its kind's options."""

    name: str
    kind: str
    weight: float
    options: Any


def parse_spec(spec: Any) -> Component:
    """A spec dict as a Component; unknown kinds and options are named with the valid ones."""
    if not isinstance(spec, Mapping):
        raise InvalidArgument(f"a scorer spec must be a mapping like {{'kind': 'exact_match'}}, "
                              f"got {spec!r}")
    spec = dict(spec)
    kind = spec.pop("kind", None)
    if kind not in KINDS:
        raise InvalidArgument(f"unknown scorer kind {kind!r}; valid kinds: {sorted(KINDS)}")
    weight = spec.pop("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or \
            not math.isfinite(weight):
        raise InvalidArgument(f"scorer {kind!r}: weight must be a finite number, got {weight!r}")
    name = spec.pop("name", kind)
    valid = {f.name for f in dataclasses.fields(KINDS[kind])}
    unknown = sorted(set(spec) - valid)
    if unknown:
        raise InvalidArgument(f"scorer {kind!r}: unknown option(s) {unknown}; valid options: "
                              f"{sorted(valid | {'kind', 'weight', 'name'})}")
    return Component(str(name), kind, float(weight), KINDS[kind](**spec))


def parse_specs(specs: Any) -> list[Component]:
    """Validate a whole `scorers` list without loading any model."""
    if isinstance(specs, Mapping):
        specs = [specs]
    if not isinstance(specs, (list, tuple)) or not specs:
        raise InvalidArgument("scorers must be a non-empty list of specs like "
                              "[{\"kind\": \"exact_match\"}]")
    components = [parse_spec(s) for s in specs]
    seen: dict[str, int] = {}
    for i, c in enumerate(components):
        seen[c.name] = seen.get(c.name, 0) + 1
        if seen[c.name] > 1:
            components[i] = dataclasses.replace(c, name=f"{c.name}_{seen[c.name]}")
    return components


class WeightedSum:
    """Σ weight · scorer(sample); an item fails if any of its components failed."""

    def __init__(self, parts: Sequence[tuple[Component, Any]]):
        self.parts = list(parts)
        self.name = "+".join(c.name for c, _ in self.parts)
        self.description = " + ".join(f"{c.weight:g}*{c.name} ({_summary(c.options)})"
                                      for c, _ in self.parts)

    def score_batch(self, samples: Sequence[SampleLike]) -> list[tuple[float, dict] | Exception]:
        columns = [(c, scorer.score_batch(samples)) for c, scorer in self.parts]
        for c, values in columns:
            if len(values) != len(samples):
                raise RuntimeError(f"scorer {c.name} returned {len(values)} values for "
                                   f"{len(samples)} samples")
        return [self._combine([(c, values[i]) for c, values in columns])
                for i in range(len(samples))]

    @staticmethod
    def _combine(values: Sequence[tuple[Component, Value]]) -> tuple[float, dict] | Exception:
        for c, v in values:
            if isinstance(v, Exception):
                return ScorerError(f"{c.name}: {v}")
        total = sum(c.weight * float(v) for c, v in values)
        return total, {c.name: float(v) for c, v in values}


def _summary(options: Any) -> str:
    doc = " ".join((type(options).__doc__ or "").split())
    return doc.split(". ")[0].rstrip(".")


def build_scorer(specs: Any, device: str = "cpu", dtype: str = "float32") -> WeightedSum:
    """The weighted sum of the scorers in `specs` (models load here, on `device`/`dtype`)."""
    return WeightedSum([(c, c.options.build(device, dtype)) for c in parse_specs(specs)])
