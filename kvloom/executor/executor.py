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
from kvloom.distributed.parallel_state import close_tensor_parallel, get_tp, init_tensor_parallel, rank_device
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


def torchrun_rank(config: EngineConfig) -> tuple[int, int] | None:
    """(rank, ranks on this host) when started by torchrun (one process per rank), else None."""
    if "LOCAL_WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        return None
    world = int(os.environ["WORLD_SIZE"])
    if world != config.parallel.tensor_parallel_size:
        raise ValueError(
            f"tensor_parallel_size {config.parallel.tensor_parallel_size} differs from torchrun's "
            f"{world} processes (WORLD_SIZE)"
        )
    return int(os.environ["RANK"]), int(os.environ["LOCAL_WORLD_SIZE"])


def is_worker_node(config: EngineConfig) -> bool:
    """Whether this process only runs ranks for another machine's engine (--node-rank > 0, or a
    torchrun process other than rank 0)."""
    if config.parallel.tensor_parallel_size == 1:
        return False
    env = torchrun_rank(config)
    return env[0] != 0 if env is not None else config.parallel.node_rank > 0


def _placement(config: EngineConfig) -> tuple[int, int, str, bool]:
    """(this process's rank, ranks on this host, where they meet, whether this process starts the
    host's other ranks)."""
    p = config.parallel
    env = torchrun_rank(config)
    if env is not None:
        return env[0], env[1], "env://", False
    local = p.tensor_parallel_size // p.nnodes
    return p.node_rank * local, local, p.dist_init_addr or f"127.0.0.1:{free_port()}", True


def run_worker_node(config: EngineConfig) -> int:
    """A machine other than node 0 (or a torchrun rank other than 0): run this host's ranks until the
    engine stops them. Returns the exit status."""
    rank, local, addr, starts = _placement(config)
    procs = start_rank_processes(config, rank + 1, local - 1, addr) if starts else []
    from kvloom.executor.worker import run_rank

    try:
        run_rank(config, rank, addr, local)
    finally:
        stop_rank_processes(procs)
    return 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_rank_processes(config: EngineConfig, first: int, count: int, addr: str) -> list[subprocess.Popen]:
    """Start ranks first .. first + count - 1 as worker processes of this host."""
    payload = pickle.dumps((config, addr, count + 1))
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


def join_tensor_parallel(config: EngineConfig, rank: int, addr: str, local: int) -> EngineConfig:
    """This process joins the ranks as ``rank``; its threads are its share of this host's CPUs, and on
    CUDA its GPU is its own. Returns the config with that GPU as its device."""
    import dataclasses

    import torch

    p = config.parallel
    cuda = config.device.device.startswith("cuda")
    if cuda:
        device = rank_device(config.device.device, rank, local, torch.cuda.device_count())
        torch.cuda.set_device(device)
        config = dataclasses.replace(config, device=dataclasses.replace(config.device, device=device))
    tp = init_tensor_parallel(rank, p.tensor_parallel_size, local, addr, p.dist_timeout, cuda)
    threads = p.num_threads or threads_per_rank(local)
    torch.set_num_threads(threads)
    if tp.shm is not None:
        tp.shm.oversubscribed = local * threads > _cpus()
    return config


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def threads_per_rank(local: int) -> int:
    return max(1, _cpus() // local)


class MultiprocExecutor(Executor):
    """Tensor parallel, this process rank 0 (or, under torchrun, the rank torchrun gave it)."""

    def __init__(self, config: EngineConfig, show_progress: bool = True) -> None:
        p = config.parallel
        rank, local, addr, starts = _placement(config)
        self.procs = start_rank_processes(config, rank + 1, local - 1, addr) if starts else []
        self._finalizer = weakref.finalize(self, _shutdown, self.procs)
        try:
            config = join_tensor_parallel(config, rank, addr, local)
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
