"""Protégé services (generator, reward, reference, learner). Needs the `server` extra."""

import os

# Transparent huge pages for torch's large CPU tensors (torch reads this once, at its first
# allocation, so it is set before any service imports torch; a deployment may set it to 0): the
# learner's serving-dtype casts and a generator's received tensors fault 2 MiB pages instead of
# 4 KiB ones. Measured here (benchmarks/weight_sync.py, real-vocabulary student, 1 generator):
# full gRPC pushes 1.34x and gloo broadcasts 1.9x faster.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
