"""Model and tokenizer loading shared by the services, plus the tokenizer and weights-layout
fingerprints.

Everything loads through `from_pretrained(path)` with `local_files_only=True`: the tiny models the
project builds for itself and real checkpoints take the same path.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
from protege.errors import InvalidArgument, NotFound

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise InvalidArgument(f"unknown dtype {name!r}; use one of {sorted(DTYPES)}")
    return DTYPES[name]


def parse_device(name: str) -> torch.device:
    """'cpu', 'cuda' or 'cuda:N'; CUDA without a GPU is a clear error, not a crash later."""
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise InvalidArgument(f"unknown device {name!r}; use cpu, cuda or cuda:N") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidArgument(
            f"device {name!r} requested but CUDA is not available; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise InvalidArgument(f"device type {device.type!r} is not supported; use cpu or cuda")
    return device


def _is_file(path: Path) -> bool:
    """`path.is_file()`, False for a path the OS cannot even look up (too long, NUL bytes)."""
    try:
        return path.is_file()
    except (OSError, ValueError):
        return False


def check_model_dir(path: str | Path) -> Path:
    p = Path(path)
    if not _is_file(p / "config.json"):
        raise NotFound(
            f"no model at {p}: expected a directory with config.json (a save_pretrained output); "
            "check the path, or build the tiny models with `protege up`")
    return p


def load_tokenizer(path: str | Path) -> Any:
    from transformers import AutoTokenizer

    p = check_model_dir(path)
    return AutoTokenizer.from_pretrained(str(p), local_files_only=True)


def meta_causal_lm(path: str | Path, dtype: torch.dtype = torch.float32) -> Any:
    """The AutoModelForCausalLM of a model directory's config on the meta device: its class,
    parameter names and shapes, with no weights read or allocated."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(check_model_dir(path)), local_files_only=True)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def weights_fingerprint(model: torch.nn.Module) -> str:
    """sha256 of a model's class and state_dict layout (sorted names and shapes). dtype and values
    are left out, so a bf16 server, an fp32 learner and a meta-device copy of one checkpoint
    agree, and two models a weight push could not go between differ."""
    layout = sorted((name, list(t.shape)) for name, t in model.state_dict(keep_vars=True).items())
    blob = json.dumps([type(model).__name__, layout], separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def load_causal_lm(path: str | Path, device: str = "cpu", dtype: str = "float32") -> Any:
    """An AutoModelForCausalLM in eval mode on `device`."""
    from transformers import AutoModelForCausalLM

    p = check_model_dir(path)
    model = AutoModelForCausalLM.from_pretrained(str(p), dtype=parse_dtype(dtype),
                                                 local_files_only=True)
    return model.to(parse_device(device)).eval()


# Text a tokenizer must split into the same ids on both sides of a distillation pair: letters,
# digits, punctuation, whitespace runs, non-Latin scripts and an emoji (byte fallback).
PROBE_TEXT = ("The quick brown fox jumps over 13 lazy dogs; 2+2=4, isn't it?\n\tdef f(x): return "
              "x ** 2  # ok\nÉtoile, naïve café — 東京, Москва, مرحبا, 🚀 ... <|end|>")


VOCAB_BLOCK = 256  # ids per block digest: a vocabulary mismatch is located to 256 ids


def _digest(pairs: list[tuple[str, int]]) -> str:
    return hashlib.sha256(json.dumps(pairs, ensure_ascii=False,
                                     separators=(",", ":")).encode()).hexdigest()


def text_config(config: Any) -> Any:
    """The text decoder's config: `config.get_text_config()` for a nested (multimodal) config such
    as Gemma-3 4B+, whose `vocab_size` lives only in `text_config`; else `config` itself."""
    getter = getattr(config, "get_text_config", None)
    return getter() if callable(getter) else config


def tokenizer_summary(tokenizer: Any) -> dict[str, Any]:
    """What decides the ids a model receives: the vocabulary (token -> id, as a digest and a
    size), the special tokens, and the ids of `PROBE_TEXT`. Pipeline classes are left out: two
    byte-identical tokenizers loaded as different classes must agree."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: (item[1], item[0]))
    digest = _digest(vocab)
    by_block: list[list[tuple[str, int]]] = [
        [] for _ in range(-(-(vocab[-1][1] + 1) // VOCAB_BLOCK) if vocab else 0)]
    for kv in vocab:  # one pass: ids are sorted, so each block keeps its id order
        by_block[kv[1] // VOCAB_BLOCK].append(kv)
    blocks = [_digest(block)[:12] for block in by_block]
    special = {name: str(value) for name, value in sorted(tokenizer.special_tokens_map.items())
               if isinstance(value, str)}
    return {
        "tokenizer_size": len(tokenizer),
        "vocab_digest": digest,
        "vocab_block_digests": blocks,
        "special_tokens": special,
        "probe_token_ids": list(tokenizer.encode(PROBE_TEXT, add_special_tokens=False)),
    }


def tokenizer_fingerprint(tokenizer: Any, summary: dict[str, Any] | None = None) -> str:
    """sha256 of `tokenizer_summary` (pass it when already computed): equal exactly when two
    tokenizers agree on what matters."""
    summary = tokenizer_summary(tokenizer) if summary is None else summary
    blob = json.dumps(summary, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def tokenizer_difference(a: Any, b: Any) -> str:
    """What differs between two VocabInfo-like records ('' when their tokenizers agree): the first
    differing special token, probe id, or the vocabularies themselves."""
    if a.tokenizer_size != b.tokenizer_size:
        return f"the tokenizers have {a.tokenizer_size} and {b.tokenizer_size} tokens"
    special_a, special_b = dict(a.special_tokens), dict(b.special_tokens)
    for name in sorted(set(special_a) | set(special_b)):
        if special_a.get(name) != special_b.get(name):
            return (f"special token {name} is {special_a.get(name)!r} vs "
                    f"{special_b.get(name)!r}")
    ids_a, ids_b = list(a.probe_token_ids), list(b.probe_token_ids)
    for i, (x, y) in enumerate(zip(ids_a, ids_b, strict=False)):
        if x != y:
            return f"the probe text tokenizes differently at position {i}: id {x} vs id {y}"
    if len(ids_a) != len(ids_b):
        return f"the probe text tokenizes into {len(ids_a)} vs {len(ids_b)} ids"
    blocks = zip(a.vocab_block_digests, b.vocab_block_digests, strict=False)
    for i, (x, y) in enumerate(blocks):
        if x != y:
            return (f"the vocabularies map tokens to different ids within ids "
                    f"[{i * VOCAB_BLOCK}, {(i + 1) * VOCAB_BLOCK})")
    if a.vocab_digest != b.vocab_digest:
        return "the vocabularies map some token to a different id"
    return ""


def vocab_info(tokenizer: Any, model_config: Any) -> dict[str, Any]:
    """The fields of `protege.v1.VocabInfo` for a tokenizer and a model config (nested or not)."""
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id
    summary = tokenizer_summary(tokenizer)
    return {
        "vocab_size": int(text_config(model_config).vocab_size),
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer, summary),
        "eos_token_id": -1 if eos is None else int(eos),
        "pad_token_id": -1 if pad is None else int(pad),
        **summary,
    }
