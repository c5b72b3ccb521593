"""Tiny real models that the project builds and saves itself (no hub downloads are possible here).

A character-level tokenizer built with `tokenizers`, and Llama models from a `LlamaConfig`, both
saved
with `save_pretrained`, so they load through the same `from_pretrained(path)` code as real
checkpoints.
The tests, `protege up` and the demo all use these builders.
"""

from __future__ import annotations

import dataclasses
import logging
import string
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
DEFAULT_CHARSET = string.digits + string.ascii_lowercase + " +-*=?:,.!()[]<>#'\"/"


@dataclasses.dataclass(frozen=True)
class TinyLlamaSpec:
    """Size of a tiny Llama. head_dim = hidden/heads must be 32 or 64 for vLLM's CPU backend."""

    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 2
    num_kv_heads: int = 2
    intermediate_size: int = 256
    max_position_embeddings: int = 256
    tie_word_embeddings: bool = False
    # 0: the tokenizer's own size. Larger pads the tokenizer with filler tokens that text never
    # encodes to, so the model has a real-sized vocabulary (151,936 for Qwen's) to probe the
    # memory and speed of everything that scales with V.
    vocab_size: int = 0


def build_char_tokenizer(out_dir: str | Path, charset: str = DEFAULT_CHARSET,
                         vocab_size: int = 0):
    """A character-level fast tokenizer (one token per character), saved to `out_dir`; with
    `vocab_size` above its size, padded with filler tokens `<|filler_N|>` up to that size."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = list(dict.fromkeys(charset))
    tokens = [*SPECIAL_TOKENS, *chars]
    tokens += [f"<|filler_{i}|>" for i in range(max(0, vocab_size - len(tokens)))]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
        unk_token="<unk>", padding_side="left")
    tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def new_tiny_llama(tokenizer, spec: TinyLlamaSpec = TinyLlamaSpec(), seed: int = 0):
    """A randomly initialised LlamaForCausalLM sized by `spec` for `tokenizer` (not saved)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=spec.hidden_size,
        num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads, intermediate_size=spec.intermediate_size,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=spec.tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def build_tiny_llama(out_dir: str | Path, tokenizer, spec: TinyLlamaSpec = TinyLlamaSpec(),
                     seed: int = 0):
    """`new_tiny_llama`, saved with the tokenizer to `out_dir`."""
    model = new_tiny_llama(tokenizer, spec, seed)
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    return model


def ensure_tiny_model(out_dir: str | Path, spec: TinyLlamaSpec = TinyLlamaSpec(), seed: int = 0,
                      charset: str = DEFAULT_CHARSET) -> Path:
    """Build (once) and return a directory holding a tiny Llama and its tokenizer."""
    out = Path(out_dir)
    if (out / "config.json").is_file() and (out / "tokenizer.json").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_char_tokenizer(out, charset, spec.vocab_size)
    build_tiny_llama(out, tokenizer, spec, seed)
    logger.info("built tiny model at %s", out)
    return out


STUDENT_SPEC = TinyLlamaSpec(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=2,
                             intermediate_size=256)
TEACHER_SPEC = TinyLlamaSpec(hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=4,
                             intermediate_size=512)


def ensure_pair(out_dir: str | Path, seed: int = 0) -> tuple[Path, Path]:
    """A tiny student and a larger tiny teacher sharing one tokenizer:
    `out_dir/{student,teacher}`."""
    out = Path(out_dir)
    student = ensure_tiny_model(out / "student", STUDENT_SPEC, seed=seed)
    teacher = ensure_tiny_model(out / "teacher", TEACHER_SPEC, seed=seed + 1)
    return student, teacher


def main(argv: list[str] | None = None) -> None:
    """python -m protege.services.common.tiny --out DIR  (builds DIR/student and DIR/teacher)"""
    import argparse
    import json

    parser = argparse.ArgumentParser(description="Build the tiny default student/teacher pair.")
    parser.add_argument("--out", required=True, help="directory for student/ and teacher/")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    student, teacher = ensure_pair(args.out, args.seed)
    print(json.dumps({"student": str(student), "teacher": str(teacher)}))


if __name__ == "__main__":
    main()
