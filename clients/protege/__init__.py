"""Protégé SDK: submit and watch hybrid RL + imitation jobs, and serve rewards. Never imports torch.

    from protege import Client, JobSpec, errors

`Client` and `JobSpec` load on first use, so `import protege` (which every service does through
`protege.errors` and `protege.serving`) stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from protege import errors

__version__ = "0.1.0"
__all__ = ["Client", "JobSpec", "errors", "__version__"]

if TYPE_CHECKING:
    from protege.client import Client
    from protege.spec import JobSpec

_LAZY = {"Client": "protege.client", "JobSpec": "protege.spec"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'protege' has no attribute {name!r}")
