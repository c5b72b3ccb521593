"""Session fixtures: tiny real models built once per test session and loaded via from_pretrained."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory) -> tuple[Path, Path]:
    """(student_dir, teacher_dir): tiny Llamas sharing one character tokenizer."""
    from protege.services.common.tiny import ensure_pair

    return ensure_pair(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def tiny_student(tiny_pair) -> Path:
    return tiny_pair[0]


@pytest.fixture(scope="session")
def tiny_teacher(tiny_pair) -> Path:
    return tiny_pair[1]


@pytest.fixture(scope="session")
def mismatched_model(tmp_path_factory) -> Path:
    """A tiny model whose tokenizer differs (another charset): same vocab size is not enough."""
    from protege.services.common.tiny import STUDENT_SPEC, ensure_tiny_model

    charset = "0123456789abcdefghijklmnopqrstuvwxyz +-*=?:,.!()[]<>#'\"|"  # '/' -> '|'
    return ensure_tiny_model(tmp_path_factory.mktemp("other") / "m", STUDENT_SPEC, charset=charset)
