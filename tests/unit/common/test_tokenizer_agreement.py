"""Tokenizers agree on what decides the ids (vocabulary, special tokens, probe ids), not on their
pipeline class; when they disagree, `tokenizer_difference` says where."""

from __future__ import annotations

import json

from protege.services.common.models import (
    PROBE_TEXT,
    VOCAB_BLOCK,
    tokenizer_difference,
    tokenizer_fingerprint,
    vocab_info,
)
from protege.services.common.tiny import build_char_tokenizer
from protege.v1 import tensor_pb2
from tokenizers import Tokenizer, decoders
from transformers import PreTrainedTokenizerFast


class _Config:
    vocab_size = 300


def info(tokenizer) -> tensor_pb2.VocabInfo:
    return tensor_pb2.VocabInfo(**vocab_info(tokenizer, _Config()))


def _variant(tokenizer, edit) -> PreTrainedTokenizerFast:
    """A copy of `tokenizer` whose backend JSON is changed by `edit`."""
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    edit(state)
    backend = Tokenizer.from_str(json.dumps(state))
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<bos>",
                                   eos_token="<eos>", unk_token="<unk>")


def test_an_incidental_pipeline_difference_still_agrees(tmp_path):
    base = build_char_tokenizer(tmp_path / "a")
    other = _variant(base, lambda s: None)
    other.backend_tokenizer.decoder = decoders.ByteFallback()  # decoding only: ids are the same
    assert base.backend_tokenizer.to_str() != other.backend_tokenizer.to_str()
    assert tokenizer_fingerprint(base) == tokenizer_fingerprint(other)
    assert tokenizer_difference(info(base), info(other)) == ""


def test_a_swapped_token_is_located_to_its_block(tmp_path):
    base = build_char_tokenizer(tmp_path / "a")
    vocab = base.get_vocab()

    def swap(state):  # '7' and '8' are not in the probe text: only the vocabulary differs
        v = state["model"]["vocab"]
        v["7"], v["8"] = v["8"], v["7"]

    other = _variant(base, swap)
    assert tokenizer_fingerprint(base) != tokenizer_fingerprint(other)
    block = vocab["7"] // VOCAB_BLOCK
    assert tokenizer_difference(info(base), info(other)) == (
        f"the vocabularies map tokens to different ids within ids "
        f"[{block * VOCAB_BLOCK}, {(block + 1) * VOCAB_BLOCK})")


def test_a_different_special_token_is_named(tmp_path):
    base = build_char_tokenizer(tmp_path / "a")
    other = _variant(base, lambda s: None)
    other.eos_token = "<pad>"
    assert "special token eos_token" in tokenizer_difference(info(base), info(other))


def test_a_probe_difference_names_the_position_and_ids(tmp_path):
    base = build_char_tokenizer(tmp_path / "a")

    def swap(state):  # 'q' is in the probe text ("quick"), '7' is not
        v = state["model"]["vocab"]
        v["q"], v["7"] = v["7"], v["q"]

    other = _variant(base, swap)
    position = base.encode(PROBE_TEXT, add_special_tokens=False).index(base.get_vocab()["q"])
    assert tokenizer_difference(info(base), info(other)) == (
        f"the probe text tokenizes differently at position {position}: "
        f"id {base.get_vocab()['q']} vs id {base.get_vocab()['7']}")


class _GappyTokenizer:
    """A vocabulary with an empty block between used ids (ids 0-2, then 3 blocks later)."""
    special_tokens_map: dict[str, str] = {}

    def get_vocab(self) -> dict[str, int]:
        return {"a": 0, "b": 1, "c": 2, "z": 3 * VOCAB_BLOCK + 5, "y": 3 * VOCAB_BLOCK + 4}

    def __len__(self) -> int:
        return 5

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [0]


def test_block_digests_cover_every_block_in_id_order_including_empty_ones():
    from protege.services.common.models import _digest, tokenizer_summary

    vocab = sorted(_GappyTokenizer().get_vocab().items(), key=lambda kv: (kv[1], kv[0]))
    expected = [_digest([kv for kv in vocab if start <= kv[1] < start + VOCAB_BLOCK])[:12]
                for start in range(0, vocab[-1][1] + 1, VOCAB_BLOCK)]
    blocks = tokenizer_summary(_GappyTokenizer())["vocab_block_digests"]
    assert blocks == expected and len(blocks) == 4
    assert blocks[1] == blocks[2] == _digest([])[:12] != blocks[0]
