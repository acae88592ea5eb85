"""Project-wide pytest setup: torch threads sized for xdist workers, and the suite's options."""

from __future__ import annotations

import os


def _threads_per_worker() -> int:
    # Under xdist each worker is a process; giving every worker all cores oversubscribes the
    # machine and makes the big matmuls slower, not faster.
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    return max(1, (os.cpu_count() or 1) // workers)


def pytest_configure(config) -> None:
    import torch

    torch.set_num_threads(_threads_per_worker())
