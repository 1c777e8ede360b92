"""Run a function on local processes joined in one gloo group: multi-rank logic tested on the CPU.

``run_on_gloo_ranks(worker, world_size, *args)`` spawns ``world_size`` processes; each joins the group
(``torch.distributed`` with gloo, one thread) and calls ``worker(rank, results, *args)``, where ``results``
is a dict shared with the parent (key it by rank). Returns that dict once every process has finished.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def run_on_gloo_ranks(worker: Callable, world_size: int = 2, *args) -> dict:
    """``worker(rank, results, *args)`` on ``world_size`` gloo ranks; the ``results`` they filled in."""
    with tempfile.TemporaryDirectory() as tmp:
        results = mp.Manager().dict()
        init_file = os.path.join(tmp, "init")
        mp.spawn(_rank_main, args=(worker, init_file, world_size, results, args), nprocs=world_size, join=True)
        return dict(results)


def _rank_main(rank: int, worker: Callable, init_file: str, world_size: int, results, args: tuple) -> None:
    warnings.simplefilter("ignore")  # megatron-core's notices that TE / Apex are absent, once per process
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    torch.set_num_threads(1)
    try:
        worker(rank, results, *args)
    finally:
        dist.destroy_process_group()
