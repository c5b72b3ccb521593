"""Datasets: JSONL and inline loading, a deterministic cursor that resumes exactly, clear errors."""

from __future__ import annotations

import json

import pytest
from protege.errors import InvalidJobSpec
from protege.services.learner.data import (
    Cursor,
    PromptRow,
    epoch_order,
    load_jsonl,
    load_rows,
    take,
)
from protege.v1 import jobs_pb2


def _rows(n: int) -> list[PromptRow]:
    return [PromptRow(f"p{i}") for i in range(n)]


def test_jsonl_prompt_and_metadata(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "1+1=", "answer": "2"}\n\n{"prompt": "2+2=", "answer": "4", '
                    '"tags": ["x"]}\n')
    rows = load_jsonl(path)
    assert [r.prompt for r in rows] == ["1+1=", "2+2="]
    assert json.loads(rows[1].metadata_json) == {"answer": "4", "tags": ["x"]}
    ds = jobs_pb2.Dataset(jsonl_path=str(path))
    assert load_rows(ds) == rows


def test_custom_prompt_field(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"question": "q1", "answer": "a"}\n')
    rows = load_rows(jobs_pb2.Dataset(jsonl_path=str(path), prompt_field="question"))
    assert rows == [PromptRow("q1", '{"answer": "a"}')]


def test_inline():
    ds = jobs_pb2.Dataset()
    ds.inline.add(prompt="a", metadata_json='{"answer": "b"}')
    ds.inline.add(prompt="c")
    assert load_rows(ds) == [PromptRow("a", '{"answer": "b"}'), PromptRow("c", "{}")]


@pytest.mark.parametrize("text, match", [
    ('{"prompt": "ok"}\nnot json\n', r"line 2 is not valid JSON"),
    ('{"text": "x"}\n', r"line 1: no 'prompt' field .*dataset.prompt_field"),
    ('["a"]\n', r"line 1: expected a JSON object"),
    ('{"prompt": ""}\n', r"non-empty string"),
    ("\n\n", r"no prompts"),
])
def test_bad_jsonl_is_a_clear_error(tmp_path, text, match):
    path = tmp_path / "bad.jsonl"
    path.write_text(text)
    with pytest.raises(InvalidJobSpec, match=match):
        load_rows(jobs_pb2.Dataset(jsonl_path=str(path)))


def test_missing_file_and_bad_sources(tmp_path):
    with pytest.raises(InvalidJobSpec, match="does not exist"):
        load_rows(jobs_pb2.Dataset(jsonl_path=str(tmp_path / "nope.jsonl")))
    with pytest.raises(InvalidJobSpec, match="exactly one source"):
        load_rows(jobs_pb2.Dataset())
    ds = jobs_pb2.Dataset(jsonl_path=str(tmp_path / "x.jsonl"))
    ds.inline.add(prompt="a")
    with pytest.raises(InvalidJobSpec, match="exactly one source"):
        load_rows(ds)
    ds = jobs_pb2.Dataset()
    ds.inline.add(prompt="a", metadata_json="{oops")
    with pytest.raises(InvalidJobSpec, match=r"inline\[0\].metadata_json is not valid JSON"):
        load_rows(ds)


def test_hf_disk_without_datasets_is_clear(tmp_path):
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(InvalidJobSpec, match="optional 'datasets' package"):
            load_rows(jobs_pb2.Dataset(hf_disk_path=str(tmp_path)))
    else:
        pytest.skip("datasets is installed; see test_hf_disk_round_trip")


def test_hf_disk_round_trip(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list([{"prompt": "a", "answer": "1"}]).save_to_disk(str(tmp_path / "d"))
    rows = load_rows(jobs_pb2.Dataset(hf_disk_path=str(tmp_path / "d")))
    assert rows == [PromptRow("a", '{"answer": "1"}')]


def test_epochs_are_seeded_permutations():
    a, b = epoch_order(10, seed=3, epoch=0), epoch_order(10, seed=3, epoch=1)
    assert sorted(a) == list(range(10)) and sorted(b) == list(range(10))
    assert a == epoch_order(10, seed=3, epoch=0)
    assert a != b and a != epoch_order(10, seed=4, epoch=0)


def test_take_covers_each_epoch_once_and_wraps():
    rows = _rows(5)
    batch, cursor = take(rows, Cursor(seed=1), 3)
    rest, cursor = take(rows, cursor, 2)
    assert sorted(r.prompt for r in batch + rest) == [f"p{i}" for i in range(5)]
    assert cursor == Cursor(seed=1, epoch=0, position=5)
    wrapped, cursor = take(rows, cursor, 7)
    assert cursor == Cursor(seed=1, epoch=2, position=2)  # 5 from epoch 1, 2 from epoch 2
    assert len(wrapped) == 7


def test_resume_from_saved_cursor_is_exact():
    rows = _rows(7)
    cursor, straight = Cursor(seed=9), []
    for _ in range(6):
        batch, cursor = take(rows, cursor, 3)
        straight.append([r.prompt for r in batch])
    # Stop after 2 batches, save the cursor as a checkpoint would (JSON), resume.
    cursor, resumed = Cursor(seed=9), []
    for _ in range(2):
        batch, cursor = take(rows, cursor, 3)
        resumed.append([r.prompt for r in batch])
    cursor = Cursor.from_dict(json.loads(json.dumps(cursor.to_dict())))
    for _ in range(4):
        batch, cursor = take(rows, cursor, 3)
        resumed.append([r.prompt for r in batch])
    assert resumed == straight
