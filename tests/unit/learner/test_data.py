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
    render_chat,
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
    assert list(rows) == [PromptRow("a", '{"answer": "1"}')]
    splits = datasets.DatasetDict({"train": datasets.Dataset.from_list([{"prompt": "a"}]),
                                   "test": datasets.Dataset.from_list([{"prompt": "t"}])})
    splits.save_to_disk(str(tmp_path / "dd"))
    rows = load_rows(jobs_pb2.Dataset(hf_disk_path=str(tmp_path / "dd"), split="test"))
    assert list(rows) == [PromptRow("t")]


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


def test_jsonl_nested_metadata_is_merged(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "1+1=", "id": 7, "metadata": {"answer": "2"}}\n')
    rows = load_rows(jobs_pb2.Dataset(jsonl_path=str(path)))
    assert json.loads(rows[0].metadata_json) == {"id": 7, "answer": "2"}
    path.write_text('{"prompt": "1+1=", "answer": "3", "metadata": {"answer": "2"}}\n')
    with pytest.raises(InvalidJobSpec, match=r"\['answer'\] given both"):
        load_rows(jobs_pb2.Dataset(jsonl_path=str(path)))


def test_parquet_directory_with_a_split(tmp_path):
    datasets = pytest.importorskip("datasets")
    (tmp_path / "pq").mkdir()
    datasets.Dataset.from_list([{"prompt": "a", "answer": "1"}]).to_parquet(
        str(tmp_path / "pq" / "train-00000.parquet"))
    datasets.Dataset.from_list([{"prompt": "b", "metadata": {"answer": "2"}},
                                {"prompt": "c", "metadata": {"answer": "3"}}]).to_parquet(
        str(tmp_path / "pq" / "test-00000.parquet"))
    rows = load_rows(jobs_pb2.Dataset(parquet_path=str(tmp_path / "pq"), split="test"))
    assert len(rows) == 2 and list(rows) == [PromptRow("b", '{"answer": "2"}'),
                                             PromptRow("c", '{"answer": "3"}')]
    assert [r.prompt for r in load_rows(jobs_pb2.Dataset(parquet_path=str(tmp_path / "pq")))] == [
        "a"]
    with pytest.raises(InvalidJobSpec, match=r"no 'dev'; set dataset.split"):
        load_rows(jobs_pb2.Dataset(parquet_path=str(tmp_path / "pq"), split="dev"))


def test_csv_file(tmp_path):
    pytest.importorskip("datasets")
    path = tmp_path / "d.csv"
    path.write_text('question,answer,metadata\n"1+1=",2,"{""level"": 1}"\n')
    rows = load_rows(jobs_pb2.Dataset(csv_path=str(path), prompt_field="question"))
    assert list(rows) == [PromptRow("1+1=", '{"answer": 2, "level": 1}')]
    with pytest.raises(InvalidJobSpec, match="does not exist"):
        load_rows(jobs_pb2.Dataset(csv_path=str(tmp_path / "nope.csv")))


def test_chat_rows_and_the_messages_column(tmp_path):
    path = tmp_path / "chat.jsonl"
    chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "1+1="}]
    path.write_text(json.dumps({"prompt": chat, "answer": "2"}) + "\n"
                    + json.dumps({"messages": [*chat, {"role": "assistant", "content": "2"}]})
                    + "\n")
    first, second = load_rows(jobs_pb2.Dataset(jsonl_path=str(path)))
    assert first.prompt == "" and first.messages == tuple(chat) == second.messages
    assert json.loads(first.metadata_json) == {"answer": "2", "messages": chat}
    assert json.loads(second.metadata_json) == {"messages": chat}  # the assistant turn dropped


class _Tokenizer:
    """Stands in for a tokenizer: only `chat_template` and `apply_chat_template` are read."""

    bos_token_id = None

    def __init__(self, template: str | None):
        self.chat_template = template

    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
        assert add_generation_prompt and not tokenize
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"


def test_render_chat_and_a_tokenizer_without_a_template():
    rows = [PromptRow("", '{"messages": []}', ({"role": "user", "content": "hi"},)),
            PromptRow("plain")]
    rendered = render_chat(rows, _Tokenizer("{{ x }}"), "m")
    assert [r.prompt for r in rendered] == ["<user>hi<assistant>", "plain"]
    with pytest.raises(InvalidJobSpec, match="student_model m has no chat_template"):
        render_chat(rows, _Tokenizer(None), "m")
