"""The services turn on transparent huge pages for torch's large CPU tensors
(services/__init__.py sets THP_MEM_ALLOC_ENABLE before torch loads): checked in a fresh process
through the kernel's own accounting (/proc/self/smaps_rollup), against a control with it off."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

PROBE = """
import protege.services, torch
t = torch.ones(64 << 20, dtype=torch.uint8)  # 64 MiB, far above torch's 2 MiB threshold
for line in open("/proc/self/smaps_rollup"):
    if line.startswith("AnonHugePages:"):
        print(int(line.split()[1]))
"""
THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def huge_kib(env_value: str | None) -> int:
    import os

    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    if env_value is not None:
        env["THP_MEM_ALLOC_ENABLE"] = env_value
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True,
                         check=True, timeout=120)
    return int(out.stdout.strip())


@pytest.mark.skipif(not THP.exists() or "[madvise]" not in THP.read_text(),
                    reason="needs Linux transparent huge pages in madvise mode (the kernel "
                           "default) to tell torch's request from the kernel's own choice")
def test_services_put_large_tensors_on_huge_pages():
    assert huge_kib("0") == 0  # the control: a deployment that turns it off
    assert huge_kib(None) >= 32 << 10  # the services' default: most of the 64 MiB
