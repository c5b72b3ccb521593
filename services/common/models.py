"""Model and tokenizer loading shared by the services, plus the tokenizer fingerprint.

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


def check_model_dir(path: str | Path) -> Path:
    p = Path(path)
    if not (p / "config.json").is_file():
        raise NotFound(
            f"no model at {p}: expected a directory with config.json (a save_pretrained output); "
            "check the path, or build the tiny models with `protege up`")
    return p


def load_tokenizer(path: str | Path) -> Any:
    from transformers import AutoTokenizer

    p = check_model_dir(path)
    return AutoTokenizer.from_pretrained(str(p), local_files_only=True)


def load_causal_lm(path: str | Path, device: str = "cpu", dtype: str = "float32") -> Any:
    """An AutoModelForCausalLM in eval mode on `device`."""
    from transformers import AutoModelForCausalLM

    p = check_model_dir(path)
    model = AutoModelForCausalLM.from_pretrained(str(p), dtype=parse_dtype(dtype),
                                                 local_files_only=True)
    return model.to(parse_device(device)).eval()


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 of the tokenizer's canonical JSON: vocab, merges, normaliser and special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        state = json.loads(backend.to_str())
        state.pop("truncation", None)
        state.pop("padding", None)
    else:
        state = {"vocab": sorted(tokenizer.get_vocab().items())}
    state["special"] = sorted(map(str, tokenizer.all_special_tokens))
    blob = json.dumps(state, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


def vocab_info(tokenizer: Any, model_config: Any) -> dict[str, Any]:
    """The fields of `protege.v1.VocabInfo` for a tokenizer and a model config."""
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id
    return {
        "vocab_size": int(model_config.vocab_size),
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "eos_token_id": -1 if eos is None else int(eos),
        "pad_token_id": -1 if pad is None else int(pad),
    }
