"""A job's prompts, and the cursor that walks them in a seeded shuffled order across epochs.

Sources (exactly one per job): prompts inline in the JobSpec, a JSONL file (one object per line
with a prompt field; every other field is metadata passed to the reward service), or a Hugging Face
`datasets` directory written with `save_to_disk` (the optional `datasets` package, imported only
when needed).

The cursor is (epoch, position): the order of epoch e is a permutation seeded by (seed, e), so a
cursor saved in a checkpoint resumes at exactly the prompt that would have come next.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
from pathlib import Path
from typing import Any

from protege.errors import InvalidJobSpec
from protege.v1 import jobs_pb2

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PromptRow:
    """One prompt and its metadata (JSON text, `{}` when none)."""

    prompt: str
    metadata_json: str = "{}"


@dataclasses.dataclass(frozen=True)
class Cursor:
    """Where the next prompt comes from: `position` within epoch `epoch`'s shuffled order."""

    seed: int = 0
    epoch: int = 0
    position: int = 0

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Cursor:
        return cls(seed=int(data["seed"]), epoch=int(data["epoch"]),
                   position=int(data["position"]))


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The shuffled order of `n` rows in `epoch`, a pure function of (seed, epoch)."""
    order = list(range(n))
    random.Random(f"protege-data:{seed}:{epoch}").shuffle(order)
    return order


def take(rows: list[PromptRow], cursor: Cursor, k: int) -> tuple[list[PromptRow], Cursor]:
    """The next `k` rows after `cursor` (wrapping into new epochs) and the advanced cursor."""
    if not rows:
        raise InvalidJobSpec("the dataset is empty; give at least one prompt")
    out: list[PromptRow] = []
    epoch, position = cursor.epoch, cursor.position
    order = epoch_order(len(rows), cursor.seed, epoch)
    while len(out) < k:
        if position >= len(rows):
            epoch, position = epoch + 1, 0
            order = epoch_order(len(rows), cursor.seed, epoch)
        out.append(rows[order[position]])
        position += 1
    return out, Cursor(cursor.seed, epoch, position)


def _row_from_object(obj: Any, prompt_field: str, where: str) -> PromptRow:
    if not isinstance(obj, dict):
        raise InvalidJobSpec(f"{where}: expected a JSON object with a {prompt_field!r} field, got "
                             f"{type(obj).__name__}")
    if prompt_field not in obj:
        raise InvalidJobSpec(f"{where}: no {prompt_field!r} field (fields: {sorted(obj)}); set "
                             "dataset.prompt_field to the column holding the prompt")
    prompt = obj[prompt_field]
    if not isinstance(prompt, str) or not prompt:
        raise InvalidJobSpec(
            f"{where}: {prompt_field!r} must be a non-empty string, got {prompt!r}")
    metadata = {k: v for k, v in obj.items() if k != prompt_field}
    return PromptRow(prompt, json.dumps(metadata, default=str))


def load_jsonl(path: str | Path, prompt_field: str = "prompt") -> list[PromptRow]:
    """Rows of a JSONL file; blank lines are skipped, anything else malformed is a clear error."""
    p = Path(path)
    try:
        exists = p.is_file()
    except (OSError, ValueError):  # a name the OS refuses (too long, NUL bytes)
        exists = False
    if not exists:
        raise InvalidJobSpec(f"dataset.jsonl_path {str(p)[:200]} does not exist or is not a file "
                             "on the learner; give a path readable by the learner process")
    rows = []
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise InvalidJobSpec(f"dataset.jsonl_path {p} cannot be read as UTF-8 text: {e}") from e
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise InvalidJobSpec(
                f"dataset.jsonl_path {p} line {number} is not valid JSON: {e}") from e
        rows.append(_row_from_object(obj, prompt_field, f"dataset.jsonl_path {p} line {number}"))
    return rows


def load_inline(prompts: list[jobs_pb2.InlinePrompt]) -> list[PromptRow]:
    rows = []
    for i, item in enumerate(prompts):
        if not item.prompt:
            raise InvalidJobSpec(f"dataset.inline[{i}].prompt is empty; every prompt needs text")
        metadata = item.metadata_json or "{}"
        try:
            json.loads(metadata)
        except json.JSONDecodeError as e:
            raise InvalidJobSpec(f"dataset.inline[{i}].metadata_json is not valid JSON: {e}") from e
        rows.append(PromptRow(item.prompt, metadata))
    return rows


def load_hf_disk(path: str | Path, prompt_field: str = "prompt") -> list[PromptRow]:
    """Rows of a `save_to_disk` directory (a Dataset, or the 'train' split of a DatasetDict)."""
    try:
        import datasets  # optional dependency: only jobs that use hf_disk_path need it
    except ImportError as e:
        raise InvalidJobSpec("dataset.hf_disk_path needs the optional 'datasets' package on the "
                             "learner: pip install 'protege[datasets]', or convert the data to "
                             "JSONL and use dataset.jsonl_path") from e
    if not Path(path).is_dir():
        raise InvalidJobSpec(f"dataset.hf_disk_path {path} is not a directory on the learner")
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # noqa: BLE001 - any load failure is a bad dataset path
        raise InvalidJobSpec(f"dataset.hf_disk_path {path} could not be loaded with "
                             f"datasets.load_from_disk: {e}") from e
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise InvalidJobSpec(f"dataset.hf_disk_path {path} holds splits {list(ds)} but no "
                                 "'train' split; save the split you want to train on")
        ds = ds["train"]
    return [_row_from_object(dict(obj), prompt_field, f"dataset.hf_disk_path {path} row {i}")
            for i, obj in enumerate(ds)]


def load_rows(dataset: jobs_pb2.Dataset) -> list[PromptRow]:
    """The prompts of a Dataset message; refuses zero or several sources and an empty dataset."""
    field_ = dataset.prompt_field or "prompt"
    sources = [bool(dataset.inline), bool(dataset.jsonl_path), bool(dataset.hf_disk_path)]
    if sum(sources) != 1:
        raise InvalidJobSpec("dataset must have exactly one source: inline prompts, jsonl_path or "
                             "hf_disk_path")
    if dataset.inline:
        rows = load_inline(list(dataset.inline))
    elif dataset.jsonl_path:
        rows = load_jsonl(dataset.jsonl_path, field_)
    else:
        rows = load_hf_disk(dataset.hf_disk_path, field_)
    if not rows:
        raise InvalidJobSpec("the dataset has no prompts; give at least one")
    return rows
