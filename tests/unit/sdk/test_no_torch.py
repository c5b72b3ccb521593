"""The SDK stays light: importing it must not pull in torch, transformers or the services."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

HEAVY = ("torch", "transformers", "protege.services")


def _imports_cleanly(code: str) -> None:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_sdk_modules_do_not_import_torch():
    modules = ["protege", "protege.client", "protege.spec", "protege.cli", "protege.launcher",
               "protege.errors", "protege.serving", "protege.configs"]
    _imports_cleanly(
        "import sys, importlib\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "from protege import Client, JobSpec, errors, __version__\n"
        f"heavy = [m for m in sys.modules if m.startswith({HEAVY!r})]\n"
        "assert not heavy, f'the SDK imported {heavy}'\n")


@pytest.mark.skipif(importlib.util.find_spec("protege.reward") is None,
                    reason="protege.reward is not written yet")
def test_brief_command_including_the_reward_kit():
    _imports_cleanly("import protege, sys; import protege.client, protege.cli, protege.reward; "
                     "assert 'torch' not in sys.modules")
