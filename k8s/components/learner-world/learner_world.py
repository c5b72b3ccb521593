"""The multi-node learner's helper in its pods: start-up order, and a health check that knows ranks.

k8s/components/learner-world puts this file into the protege-config ConfigMap; the learner's pods
mount it at /etc/protege/learner_world.py and run it with the image's Python. `wait` needs only the
standard library; `health` uses the grpcio the image has anyway.

    python /etc/protege/learner_world.py wait protege-generator-headless protege-reference-headless
        The init container of every learner pod. Node rank 0 (PET_NODE_RANK) waits until each named
        headless Service resolves, which happens once it has a ready pod: the jobs rank 0 resumes
        then find their generators and references, instead of failing after the learner's
        outage budget (a vLLM generator can take many minutes to load). Every other rank waits
        until PET_MASTER_ADDR:PET_MASTER_PORT accepts a connection: torchrun's rendezvous store,
        which rank 0's torchrun opens once rank 0 is past its own wait. So no rank's torchrun
        starts its rendezvous timeout before rank 0 can answer.

    python /etc/protege/learner_world.py health 50051
        An exec probe for pods that share one template across ranks (Kubeflow Trainer's TrainJob).
        Ranks above 0 serve no port and pass; rank 0 passes only when grpc.health.v1 on
        127.0.0.1:PORT answers SERVING, like the gRPC probes of every other Protégé pod.

JobSet's dependsOn could order the start-up too, but it deadlocks under gang scheduling: the
scheduler waits for every pod of the gang, JobSet waits for the leader to be ready before it
creates the workers. An init container orders the processes without holding back any pod.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import time
from collections.abc import Callable

logger = logging.getLogger(__name__)

POLL_S = 2.0  # between attempts: cheap DNS lookups and TCP connects
# A log line this often while still waiting, so `kubectl logs -c wait-for-world` says why.
REPORT_EVERY_S = 30.0
CONNECT_TIMEOUT_S = 3.0


def node_rank() -> int:
    """This pod's node rank: set by the JobSet manifest, or injected by Kubeflow Trainer."""
    return int(os.environ.get("PET_NODE_RANK", "0"))


def resolves(name: str) -> bool:
    """Whether `name` has an address. A headless Service's name resolves only to ready pods."""
    try:
        return bool(socket.getaddrinfo(name, None, type=socket.SOCK_STREAM))
    except OSError:
        return False


def accepts(host: str, port: int) -> bool:
    """Whether host:port accepts a TCP connection (closed at once; torchrun's store ignores it)."""
    try:
        socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S).close()
        return True
    except OSError:
        return False


def wait_until(ready: Callable[[], bool], what: str, poll_s: float = POLL_S) -> None:
    """Poll `ready` until it holds; no deadline (the gang's readiness timeout is the judge)."""
    start = last_report = time.monotonic()
    while not ready():
        if time.monotonic() - last_report >= REPORT_EVERY_S:
            logger.info("still waiting for %s (%.0f s)", what, time.monotonic() - start)
            last_report = time.monotonic()
        time.sleep(poll_s)
    logger.info("%s: ready after %.0f s", what, time.monotonic() - start)


def wait(names: list[str], poll_s: float = POLL_S) -> int:
    rank = node_rank()
    if rank == 0:
        for name in names:
            wait_until(lambda name=name: resolves(name), f"a ready pod behind {name}", poll_s)
        return 0
    host, port = os.environ["PET_MASTER_ADDR"], int(os.environ["PET_MASTER_PORT"])
    wait_until(lambda: accepts(host, port), f"rank 0's rendezvous store at {host}:{port}", poll_s)
    return 0


def health(port: int) -> int:
    """0 when this rank is healthy: ranks above 0 always, rank 0 when its server is SERVING."""
    if node_rank() != 0:
        return 0
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=CONNECT_TIMEOUT_S)
        except grpc.RpcError as e:
            print(f"rank 0 health: {e.code().name}", file=sys.stderr)
            return 1
    serving = reply.status == health_pb2.HealthCheckResponse.SERVING
    return 0 if serving else 1


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if len(argv) >= 1 and argv[0] == "wait":
        return wait(argv[1:])
    if len(argv) == 2 and argv[0] == "health":
        return health(int(argv[1]))
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
