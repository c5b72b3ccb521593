"""The Node.js reward example (examples/reward-node), written from reward.proto alone, passes every
conformance check, with and without a required token (issue 14: a contract other teams can
implement without Python).

Needs `node` (>= 18) and the example's packages: `npm ci --prefix examples/reward-node`. Without
them the test skips, saying so.
"""

from __future__ import annotations

import shutil
import signal
from pathlib import Path

import pytest
from protege.conformance import run_checks

pytestmark = pytest.mark.integration

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "reward-node"


@pytest.fixture
def node_example():
    if shutil.which("node") is None:
        pytest.skip("node is not installed")
    if not (EXAMPLE / "node_modules" / "@grpc" / "grpc-js").is_dir():
        pytest.skip(f"the example's packages are not installed: npm ci --prefix {EXAMPLE}")
    return EXAMPLE


@pytest.mark.parametrize("token", [None, "node-example-token"])
def test_the_node_reward_passes_every_check(node_example, serve_process, tmp_path, token):
    ready = tmp_path / "ready.json"
    env = {"PROTEGE_TOKEN": token or ""}  # "" : no token required, whatever the shell says
    proc, address = serve_process(["node", str(node_example / "server.js"), "--port", "0",
                                   "--ready-file", str(ready)], ready, env=env)
    results = run_checks(address, token=token, timeout=10)
    assert all(r.passed for r in results), [r for r in results if not r.passed]
    by_name = {r.name: r.detail for r in results}
    assert by_name["reflection"].startswith("v1 lists")  # grpc-js serves reflection v1
    if token:
        assert by_name["auth"] == "no token: UNAUTHENTICATED; a wrong token: UNAUTHENTICATED"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
