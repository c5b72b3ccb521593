"""A job's prompts, and the cursor that walks them in a seeded shuffled order across epochs.

Sources (exactly one per job): prompts inline in the JobSpec, a JSONL file, or, through the optional
`datasets` package (imported only when needed), a parquet or CSV file or directory and a Hugging
Face `save_to_disk` directory, with `split` naming the split. The `datasets` sources stay Arrow,
memory-mapped on disk: their rows are converted when the cursor reaches them.

One row shape for every source. The prompt field (`prompt_field`, default "prompt") holds text, or
a chat: a list of {role, content} messages. A row without the prompt field but with a "messages"
column is a chat whose last assistant turn, if present, is dropped (TRL's conversational format).
Every other field is metadata for the reward service, and a nested "metadata" object (or, from CSV,
its JSON text) is merged into it; a key given both ways with different values is refused. A chat
row's metadata also carries its prompt messages as "messages", and `render_chat` turns it into text
with the student tokenizer's chat template: that text is the prompt the generator completes and the
reference scores.

The cursor is (epoch, position): the order of epoch e is a permutation seeded by (seed, e), so a
cursor saved in a checkpoint resumes at exactly the prompt that would have come next.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from protege.errors import InvalidJobSpec
from protege.spec import DATASET_SOURCES, DEFAULT_PROMPT_FIELD, DEFAULT_SPLIT
from protege.v1 import jobs_pb2

logger = logging.getLogger(__name__)

CHAT_FIELD = "messages"  # TRL's conversational column, and the metadata key chat rows add


@dataclasses.dataclass(frozen=True)
class PromptRow:
    """One prompt and its metadata (JSON text, `{}` when none). A chat row carries its
    `messages` and an empty `prompt` until `render_chat` renders them."""

    prompt: str
    metadata_json: str = "{}"
    messages: tuple[dict[str, str], ...] = ()


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


def take(rows: Sequence[PromptRow], cursor: Cursor, k: int) -> tuple[list[PromptRow], Cursor]:
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


def _messages(value: list[Any], where: str,
              drop_last_assistant: bool) -> tuple[dict[str, str], ...]:
    for i, message in enumerate(value):
        if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)):
            raise InvalidJobSpec(f"{where}: message {i} must be an object with string 'role' and "
                                 f"'content', got {str(message)[:200]}")
    messages = tuple({"role": m["role"], "content": m["content"]} for m in value)
    if drop_last_assistant and messages and messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    if not messages:
        raise InvalidJobSpec(f"{where}: the chat has no messages to prompt with")
    return messages


def _metadata(fields: dict[str, Any], where: str) -> dict[str, Any]:
    """The row's other fields, with a nested `metadata` object (or its JSON text) merged in."""
    nested = fields.pop("metadata", None)
    if isinstance(nested, str):
        try:
            nested = json.loads(nested)
        except json.JSONDecodeError as e:
            raise InvalidJobSpec(f"{where}: 'metadata' is text but not JSON: {e}") from e
    if nested is None:
        return fields
    if not isinstance(nested, dict):
        raise InvalidJobSpec(f"{where}: 'metadata' must be an object, got {type(nested).__name__}; "
                             "put metadata fields beside the prompt or in a nested object")
    clash = sorted(k for k in nested if k in fields and fields[k] != nested[k])
    if clash:
        raise InvalidJobSpec(f"{where}: {clash} given both beside the prompt and in 'metadata' "
                             "with different values; keep one")
    return {**fields, **nested}


def _row_from_object(obj: Any, prompt_field: str, where: str) -> PromptRow:
    if not isinstance(obj, dict):
        raise InvalidJobSpec(f"{where}: expected a JSON object with a {prompt_field!r} field, got "
                             f"{type(obj).__name__}")
    key = prompt_field if prompt_field in obj else CHAT_FIELD if CHAT_FIELD in obj else None
    if key is None:
        raise InvalidJobSpec(f"{where}: no {prompt_field!r} field (fields: {sorted(obj)}); set "
                             "dataset.prompt_field to the column holding the prompt, or give a "
                             f"{CHAT_FIELD!r} column of chat messages")
    value = obj[key]
    metadata = _metadata({k: v for k, v in obj.items() if k != key}, where)
    if isinstance(value, str) and value:
        return PromptRow(value, json.dumps(metadata, default=str))
    if isinstance(value, list):
        messages = _messages(value, where, drop_last_assistant=key == CHAT_FIELD)
        metadata[CHAT_FIELD] = list(messages)
        return PromptRow("", json.dumps(metadata, default=str), messages)
    raise InvalidJobSpec(f"{where}: {key!r} must be a non-empty string or a list of "
                         f"{{role, content}} messages, got {str(value)[:200]!r}")


class LazyRows(Sequence[PromptRow]):
    """`convert(i, base[i])` on access: a memory-mapped table is never all turned into rows."""

    def __init__(self, base: Sequence[Any], convert: Callable[[int, Any], PromptRow]) -> None:
        self.base, self.convert = base, convert

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return self.convert(i, self.base[i])


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
        where = f"dataset.inline[{i}]"
        if not item.prompt:
            raise InvalidJobSpec(f"{where}.prompt is empty; every prompt needs text")
        try:
            metadata = json.loads(item.metadata_json or "{}")
        except json.JSONDecodeError as e:
            raise InvalidJobSpec(f"{where}.metadata_json is not valid JSON: {e}") from e
        if not isinstance(metadata, dict):
            raise InvalidJobSpec(f"{where}.metadata_json must be a JSON object")
        rows.append(PromptRow(item.prompt, json.dumps(_metadata(metadata, where), default=str)))
    return rows


def _datasets(field: str) -> Any:
    try:
        import datasets  # optional dependency: only the Arrow-backed sources need it
    except ImportError as e:
        raise InvalidJobSpec(f"dataset.{field} needs the optional 'datasets' package on the "
                             "learner: pip install 'protege[datasets]', or convert the data to "
                             "JSONL and use dataset.jsonl_path") from e
    return datasets


def _split(ds: Any, split: str, where: str) -> Any:
    """`split` of a DatasetDict; a plain Dataset has no splits and is used whole."""
    if not hasattr(ds, "keys"):
        return ds
    if split not in ds:
        raise InvalidJobSpec(f"{where} holds splits {list(ds)} but no {split!r}; set "
                             "dataset.split to one of them")
    return ds[split]


def _arrow_rows(table: Any, prompt_field: str, where: str) -> LazyRows:
    return LazyRows(table, lambda i, obj: _row_from_object(dict(obj), prompt_field,
                                                             f"{where} row {i}"))


def load_hf_disk(path: str | Path, prompt_field: str = "prompt",
                 split: str = DEFAULT_SPLIT) -> Sequence[PromptRow]:
    """Rows of a `save_to_disk` directory (a Dataset, or `split` of a DatasetDict)."""
    datasets = _datasets("hf_disk_path")
    if not Path(path).is_dir():
        raise InvalidJobSpec(f"dataset.hf_disk_path {path} is not a directory on the learner")
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # noqa: BLE001 - any load failure is a bad dataset path
        raise InvalidJobSpec(f"dataset.hf_disk_path {path} could not be loaded with "
                             f"datasets.load_from_disk: {e}") from e
    where = f"dataset.hf_disk_path {path}"
    return _arrow_rows(_split(ds, split, where), prompt_field, where)


def load_files(kind: str, path: str | Path, prompt_field: str = "prompt",
               split: str = DEFAULT_SPLIT) -> Sequence[PromptRow]:
    """Rows of a parquet or CSV file (`kind`), or of `split` of a directory of them (splits are
    named by the file names, as on the Hugging Face hub); converted once to a memory-mapped
    Arrow cache by `datasets.load_dataset`."""
    field = f"{kind}_path"
    datasets = _datasets(field)
    where, p = f"dataset.{field} {str(path)[:200]}", Path(path)
    if not (p.is_dir() or p.is_file()):
        raise InvalidJobSpec(f"{where} does not exist on the learner; give a path readable by "
                             "the learner process")
    try:
        if p.is_file():
            ds = datasets.load_dataset(kind, data_files={DEFAULT_SPLIT: str(p)})
        else:  # only the wanted split's files are read: splits may differ in columns
            patterns = datasets.data_files.get_data_patterns(str(p))
            _split(patterns, split, where)
            ds = datasets.load_dataset(kind, data_dir=str(p), data_files={split: patterns[split]})
    except InvalidJobSpec:
        raise
    except Exception as e:  # noqa: BLE001 - any load failure is a bad dataset file
        raise InvalidJobSpec(f"{where} could not be read as {kind}: {e}") from e
    return _arrow_rows(_split(ds, split, where), prompt_field, where)


def load_rows(dataset: jobs_pb2.Dataset) -> Sequence[PromptRow]:
    """The prompts of a Dataset message; refuses zero or several sources and an empty dataset.
    Arrow-backed sources check their first row here and the others when the cursor reaches them."""
    field_ = dataset.prompt_field or DEFAULT_PROMPT_FIELD
    split = dataset.split or DEFAULT_SPLIT
    sources = [name for name in DATASET_SOURCES if getattr(dataset, name)]
    if len(sources) != 1:
        raise InvalidJobSpec(f"dataset must have exactly one source of "
                             f"{', '.join(DATASET_SOURCES)}; got {sources or 'none'}")
    rows: Sequence[PromptRow]
    if dataset.inline:
        rows = load_inline(list(dataset.inline))
    elif dataset.jsonl_path:
        rows = load_jsonl(dataset.jsonl_path, field_)
    elif dataset.hf_disk_path:
        rows = load_hf_disk(dataset.hf_disk_path, field_, split)
    else:
        kind = "parquet" if dataset.parquet_path else "csv"
        rows = load_files(kind, dataset.parquet_path or dataset.csv_path, field_, split)
    if not len(rows):
        raise InvalidJobSpec("the dataset has no prompts; give at least one")
    rows[0]  # noqa: B018 - an Arrow source's first row is checked now, not at step 1
    return rows


# ------------------------------------------------------------------------------------ chat prompts


def _adds_bos(tokenizer: Any) -> bool:
    bos = getattr(tokenizer, "bos_token_id", None)
    return bos is not None and tokenizer("x")["input_ids"][:1] == [bos]


def _renderer(tokenizer: Any, model: str) -> Callable[[int, PromptRow], PromptRow]:
    """Chat row -> row whose prompt is the rendered text. The generator tokenizes that text with
    special tokens, so a BOS the template wrote is stripped when the tokenizer adds its own."""
    strip = tokenizer.bos_token if _adds_bos(tokenizer) else None

    def render(i: int, row: PromptRow) -> PromptRow:
        if not row.messages:
            return row
        try:
            text = tokenizer.apply_chat_template(list(row.messages), add_generation_prompt=True,
                                                 tokenize=False)
        except Exception as e:  # noqa: BLE001 - a template failing on a row is bad data
            raise InvalidJobSpec(f"row {i}: the chat template of student_model {model} failed on "
                                 f"its messages: {e}") from e
        if strip and text.startswith(strip):
            text = text[len(strip):]
        return dataclasses.replace(row, prompt=text)

    return render


def render_chat(rows: Sequence[PromptRow], tokenizer: Any, model: str) -> Sequence[PromptRow]:
    """`rows` with chat rows rendered by `tokenizer`'s chat template (`add_generation_prompt`):
    all at once for in-memory rows, on access for an Arrow source (whose column types are uniform,
    so its first row says whether it is a chat dataset)."""
    sample = rows if isinstance(rows, list) else rows[:1]
    if not any(r.messages for r in sample):
        return rows
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidJobSpec(f"the dataset holds chat messages but the tokenizer of student_model "
                             f"{model} has no chat_template; use an instruct model's tokenizer, "
                             "add a chat_template to its tokenizer_config.json, or give prompts "
                             "as text")
    render = _renderer(tokenizer, model)
    if isinstance(rows, list):
        return [render(i, row) for i, row in enumerate(rows)]
    return LazyRows(rows, render)


def load_prompts(dataset: jobs_pb2.Dataset, student_model: str) -> Sequence[PromptRow]:
    """`load_rows`, then chat rows rendered with the student tokenizer's template."""
    rows = load_rows(dataset)
    sample = rows if isinstance(rows, list) else rows[:1]
    if not any(r.messages for r in sample):
        return rows
    from protege.services.common.models import load_tokenizer

    return render_chat(rows, load_tokenizer(student_model), student_model)
