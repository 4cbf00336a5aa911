"""This process's place among the tensor-parallel ranks, and the collectives the layers call.

One group per engine: ``init_tensor_parallel`` meets the other ranks on torch.distributed (gloo, a TCP
store at ``dist_init_addr``) and, when they all run on this host, opens a shared-memory segment for the
collectives (kvloom/distributed/shm.py: gloo's loopback all-reduce costs 100-300 us, twice a layer).
Ranks on several machines use gloo itself. On CUDA the layers' collectives (GPU tensors) go through a
second group on NCCL (as vLLM's device group); the steps rank 0 hands out still go the CPU way. Without a
group (one rank) every collective is the identity, so the layers call them unconditionally.
"""

from __future__ import annotations

import datetime
import os
import pickle
from dataclasses import dataclass

import torch

from kvloom.distributed.shm import ShmGroup
from kvloom.logger import init_logger

logger = init_logger(__name__)


class RankUnreachable(RuntimeError):
    pass


@dataclass
class TensorParallel:
    rank: int = 0
    size: int = 1
    shm: ShmGroup | None = None  # one host: collectives through shared memory; None: gloo (or one rank)
    device_group: object = None  # CUDA: the NCCL group of the GPU tensors' collectives

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over the ranks, in place; every rank gets the same bits."""
        if self.size == 1:
            return x
        import torch.distributed as dist

        if x.is_cuda:
            # NOTE: in the model dtype (NCCL's ring: each element summed on one rank, then copied to all)
            dist.all_reduce(x, group=self.device_group)
            return x
        if self.shm is not None:
            return self.shm.all_reduce(x)
        # NOTE: gloo sums in fp32 here whatever the model dtype: one rounding, as the shared-memory path
        acc = x.float()
        dist.all_reduce(acc)
        return x.copy_(acc)

    def gather(self, x: torch.Tensor) -> list[torch.Tensor] | None:
        """Every rank's ``x`` on rank 0 (same shape on all ranks), in rank order; None elsewhere."""
        if self.size == 1:
            return [x]
        import torch.distributed as dist

        x = x.contiguous()
        if x.is_cuda:  # NCCL gathers to every rank
            parts = [torch.empty_like(x) for _ in range(self.size)]
            dist.all_gather(parts, x, group=self.device_group)
            return parts if self.rank == 0 else None
        if self.shm is not None:
            return self.shm.gather(x)
        parts = [torch.empty_like(x) for _ in range(self.size)] if self.rank == 0 else None
        dist.gather(x, parts, dst=0)
        return parts

    def min(self, value: int) -> int:
        """The least of the ranks' ``value`` (the KV blocks every rank can hold)."""
        if self.size == 1:
            return value
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)  # the CPU (gloo) group
        return int(t)

    def send(self, obj: object) -> None:
        """Rank 0: hand ``obj`` (a step's inputs, or None to stop) to every other rank."""
        if self.shm is not None:
            self.shm.send(obj)
            return
        import torch.distributed as dist

        data = torch.frombuffer(
            bytearray(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)), dtype=torch.uint8
        )
        dist.broadcast(torch.tensor([data.numel()], dtype=torch.int64), src=0)
        dist.broadcast(data, src=0)

    def recv(self) -> object:
        """The other ranks: the next object rank 0 sent."""
        if self.shm is not None:
            return self.shm.recv()
        import torch.distributed as dist

        n = torch.zeros(1, dtype=torch.int64)
        dist.broadcast(n, src=0)
        data = torch.empty(int(n), dtype=torch.uint8)
        dist.broadcast(data, src=0)
        return pickle.loads(data.numpy().tobytes())


_group = TensorParallel()


def get_tp() -> TensorParallel:
    return _group


def vocab_range(vocab_size: int) -> tuple[int, int]:
    """[start, start + rows): this rank's rows of the embedding and the output layer (equal slices, the
    last rank's padded)."""
    rows = -(-vocab_size // _group.size)
    return _group.rank * rows, rows


def local_heads(num_heads: int, num_kv_heads: int) -> tuple[int, int, int]:
    """(query heads, KV heads, first KV head) of this rank: KV heads split, or replicated when fewer than
    the ranks (each rank keeps the one its query heads read)."""
    size, rank = _group.size, _group.rank
    return num_heads // size, max(1, num_kv_heads // size), rank * num_kv_heads // size


def rank_device(device: str, rank: int, local: int, gpus: int) -> str:
    """The device of tensor-parallel ``rank`` when ``local`` ranks share this host: on CUDA one GPU each,
    counted from the index ``device`` names (cuda:N; 0 without one)."""
    if not device.startswith("cuda"):
        return device
    first = int(device.partition(":")[2] or 0)
    gpu = first + rank % local
    if first + local > gpus:
        raise ValueError(
            f"tensor_parallel_size: {local} ranks on this host need GPUs {first}..{first + local - 1}; "
            f"torch sees {gpus}"
        )
    return f"cuda:{gpu}"


def _pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True


def init_tensor_parallel(
    rank: int, size: int, local_size: int, addr: str, timeout_s: int, cuda: bool = False
) -> TensorParallel:
    """Meet the other ``size - 1`` ranks at ``addr`` (HOST:PORT; rank 0 listens there) and set this
    process's group; ``cuda``: with an NCCL group for the GPU tensors (each rank's GPU already set).
    Raises RankUnreachable naming the address when they do not all come in time."""
    global _group
    import torch.distributed as dist

    # NOTE: the group's own timeout bounds every gloo collective, and an idle server's workers wait in one
    # (several nodes) between requests: a day. A peer that dies closes its connections, which gloo reports
    # at once. Meeting the others is bounded by timeout_s (the store's).
    day = datetime.timedelta(days=1)
    try:
        if addr == "env://":  # under torchrun: its store, at MASTER_ADDR:MASTER_PORT
            dist.init_process_group("gloo", init_method="env://", rank=rank, world_size=size, timeout=day)
        else:
            host, _, port = addr.rpartition(":")
            store = dist.TCPStore(
                host,
                int(port),
                size,
                is_master=rank == 0,
                timeout=datetime.timedelta(seconds=timeout_s),
                wait_for_workers=False,
            )
            dist.init_process_group("gloo", store=store, rank=rank, world_size=size, timeout=day)
        pids: list[int | None] = [None] * size
        dist.all_gather_object(pids, (os.uname().nodename, os.getpid()))
    except (RuntimeError, ValueError, OSError) as e:
        raise RankUnreachable(
            f"tensor parallel: rank {rank} of {size} could not meet the others at {addr} within "
            f"{timeout_s}s (dist_init_addr, dist_timeout): {e}"
        ) from e
    group = TensorParallel(rank, size)
    hosts = {h for h, _ in pids}
    # NOTE: by the launch's own count (nnodes), not only host names: two "nodes" on one host (tests, or
    # containers sharing a name) talk through gloo as separate machines would.
    if len(hosts) == 1 and local_size == size:
        name = [None]
        if rank == 0:
            group.shm = ShmGroup.create(size)
            name = [group.shm.name]
        dist.broadcast_object_list(name, src=0)
        if rank != 0:
            group.shm = ShmGroup.attach(name[0], rank, size)
        mine = os.getpid()
        others = [(r, p) for r, (_, p) in enumerate(pids) if p != mine]

        def dead() -> str | None:
            for r, p in others:
                if not _pid_alive(p):
                    return f"tensor parallel rank {r} (pid {p}) died"
            return None

        group.shm.alive = dead
        dist.barrier()
        if rank == 0:
            group.shm.unlink()  # every rank has it mapped
    if cuda:
        group.device_group = dist.new_group(backend="nccl")
    logger.info(
        "Tensor parallel: rank %d of %d (%s), collectives through %s",
        rank,
        size,
        f"{size // local_size} node{'s' if size > local_size else ''}",
        "NCCL" if cuda else "shared memory" if group.shm is not None else "gloo",
    )
    _group = group
    return group


def close_tensor_parallel() -> None:
    global _group
    if _group.shm is not None:
        _group.shm.close()
    if _group.size > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    _group = TensorParallel()
