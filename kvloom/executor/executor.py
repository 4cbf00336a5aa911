"""Executors: the engine's one way to run the model, whatever the number of ranks.

``Executor`` runs the model runner in this process (one rank: the default, nothing in between).
``MultiprocExecutor`` is tensor parallel: this process is rank 0 (the engine's: it schedules, samples and
answers), and each other rank of this host is a worker process (``python -m kvloom.executor.worker``) that
loads its slices of the weights, keeps its slice of the KV cache and runs every step's forward with rank 0
(ModelRunner.serve_peer). Ranks on other machines are started there by the same command with
``--node-rank`` (kvloom.cli), or by torchrun.

NOTE: workers are new interpreters (subprocess), not multiprocessing children: spawn and forkserver run
the parent's main module again in each child, which breaks a user's script without a __main__ guard.
"""

from __future__ import annotations

import os
import pickle
import socket
import subprocess
import sys
import weakref

from kvloom.config import EngineConfig
from kvloom.distributed.parallel_state import close_tensor_parallel, get_tp, init_tensor_parallel
from kvloom.logger import init_logger
from kvloom.worker.model_runner import ModelRunner

logger = init_logger(__name__)


class Executor:
    """One rank: the model runner in this process."""

    def __init__(self, config: EngineConfig, show_progress: bool = True) -> None:
        self.runner = ModelRunner(config, show_progress)

    def shutdown(self) -> None:
        pass

    @staticmethod
    def create(config: EngineConfig, show_progress: bool = True) -> Executor:
        if config.parallel.tensor_parallel_size > 1:
            return MultiprocExecutor(config, show_progress)
        return Executor(config, show_progress)


def torchrun_rank() -> tuple[int, int, int] | None:
    """(rank, world size, ranks on this host) when started by torchrun, else None."""
    if "TORCHELASTIC_RUN_ID" not in os.environ and "LOCAL_WORLD_SIZE" not in os.environ:
        return None
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_WORLD_SIZE"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_rank_processes(config: EngineConfig, first: int, count: int, addr: str) -> list[subprocess.Popen]:
    """Start ranks first .. first + count - 1 as worker processes of this host."""
    payload = pickle.dumps((config, addr))
    procs = []
    for rank in range(first, first + count):
        proc = subprocess.Popen(
            [sys.executable, "-m", "kvloom.executor.worker", str(rank)], stdin=subprocess.PIPE
        )
        proc.stdin.write(payload)
        proc.stdin.close()
        procs.append(proc)
    return procs


def stop_rank_processes(procs: list[subprocess.Popen], timeout: float = 5.0) -> None:
    for proc in procs:
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def join_tensor_parallel(config: EngineConfig, rank: int, addr: str) -> None:
    """This process joins the ranks as ``rank``; its threads are its share of this host's CPUs."""
    import torch

    p = config.parallel
    local = p.tensor_parallel_size // p.nnodes
    init_tensor_parallel(rank, p.tensor_parallel_size, local, addr, p.dist_timeout)
    torch.set_num_threads(p.num_threads or threads_per_rank(local))


def threads_per_rank(local: int) -> int:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cpus // local)


class MultiprocExecutor(Executor):
    """Tensor parallel, this process rank 0 (or, under torchrun, the rank torchrun gave it)."""

    def __init__(self, config: EngineConfig, show_progress: bool = True) -> None:
        p = config.parallel
        local = p.tensor_parallel_size // p.nnodes
        self.procs: list[subprocess.Popen] = []
        env = torchrun_rank()
        if env is not None:
            rank, addr = env[0], "env://"
        else:
            rank, addr = p.node_rank * local, p.dist_init_addr or f"127.0.0.1:{free_port()}"
            self.procs = start_rank_processes(config, rank + 1, local - 1, addr)
        self._finalizer = weakref.finalize(self, _shutdown, self.procs)
        try:
            join_tensor_parallel(config, rank, addr)
            logger.info(
                "Tensor parallel %d (%d node%s): rank %d here, %d worker process%s, %d threads each",
                p.tensor_parallel_size,
                p.nnodes,
                "s" if p.nnodes > 1 else "",
                rank,
                len(self.procs),
                "es" if len(self.procs) != 1 else "",
                p.num_threads or threads_per_rank(local),
            )
            self.runner = ModelRunner(config, show_progress)
        except BaseException:
            self._finalizer()
            raise

    def shutdown(self) -> None:
        self._finalizer()


def _shutdown(procs: list[subprocess.Popen]) -> None:
    tp = get_tp()
    if tp.size > 1 and tp.rank == 0:
        try:
            tp.send(None)  # the workers' loops end
        except Exception:  # noqa: BLE001 - a dead peer: nothing to tell
            pass
    stop_rank_processes(procs)
    close_tensor_parallel()
