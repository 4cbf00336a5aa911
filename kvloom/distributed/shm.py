"""Collectives between the tensor-parallel ranks of one host, through shared memory.

gloo sends every all-reduce through the loopback TCP stack: 100-300 us for a 32-row hidden state, twice a
layer. Here each rank copies its tensor into its own slot of one shared segment, raises its counter, and
sums the slots once every counter has caught up (vLLM's CPU backend does the same in C++). Every rank sums
the slots in rank order, so all ranks hold bit-identical results, as the replicated parts of the model
need. The step's inputs go from rank 0 to the others the same way (a pickled message).

Ordering: the counters are plain 8-byte stores and loads; on x86-64 (total store order) a counter is seen
only after the slot written before it. Two sets of slots alternate, so a rank may start the next
collective while another still reads the last one; it cannot get two ahead, because each collective waits
for every rank's counter.

Waiting spins, then sleeps in growing steps (an idle server's workers wait here between requests without
keeping a core busy), and asks ``alive()`` now and then, so a dead peer is an error, never a hang.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import pickle
import secrets
import tempfile
import time
from collections.abc import Callable

import numpy as np
import torch

SLOT_BYTES = 16 << 20  # per rank and parity; larger tensors go in pieces
MESSAGE_BYTES = 32 << 20  # per parity: the largest pickled step input
_HEADER = 4096  # counters, each on its own 64-byte line
_LIVENESS_S = 0.5


class PeerDied(RuntimeError):
    pass


class ShmGroup:
    """One host's ranks on one shared segment (a file in /dev/shm, mapped by every rank). Rank 0 creates
    it (``create``), the others map it by path (``attach``); once all have, rank 0 removes the file
    (``unlink``), so nothing is left behind whatever way the processes end."""

    def __init__(self, path: str, rank: int, world: int, create: bool) -> None:
        if world > 16:
            raise ValueError(f"tensor parallel: at most 16 ranks on one host, got {world}")
        self.path, self.rank, self.world = path, rank, world
        size = self.size(world)
        fd = os.open(path, os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0), 0o600)
        try:
            if create:
                # NOTE: pages are committed as they are first written; a segment this size costs nothing idle.
                os.ftruncate(fd, size)
            self._map = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        buf = memoryview(self._map)
        # counters: [0, r]: rank r's collectives done; [1, r]: messages rank r has read; [2, 0]: messages sent
        self._counters = np.ndarray((3, world, 8), dtype=np.int64, buffer=buf[: 3 * world * 64])
        self._lengths = np.ndarray((2,), dtype=np.int64, buffer=buf[_HEADER - 16 : _HEADER])
        slots = np.ndarray(
            (2, world, SLOT_BYTES), dtype=np.uint8, buffer=buf[_HEADER : _HEADER + 2 * world * SLOT_BYTES]
        )
        self._slots = torch.from_numpy(slots)
        start = _HEADER + 2 * world * SLOT_BYTES
        self._messages = buf[start : start + 2 * MESSAGE_BYTES]
        self._seq = int(self._counters[0, rank, 0])
        self._read = int(self._counters[1, rank, 0])
        self.alive: Callable[[], str | None] = lambda: None  # a dead peer's description, or None
        self.oversubscribed = False  # this host's ranks have more threads than it has CPUs

    @staticmethod
    def size(world: int) -> int:
        return _HEADER + 2 * world * SLOT_BYTES + 2 * MESSAGE_BYTES

    @classmethod
    def create(cls, world: int) -> ShmGroup:
        folder = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
        return cls(os.path.join(folder, f"kvloom-tp-{os.getpid()}-{secrets.token_hex(4)}"), 0, world, True)

    @classmethod
    def attach(cls, path: str, rank: int, world: int) -> ShmGroup:
        return cls(path, rank, world, False)

    @property
    def name(self) -> str:
        return self.path

    def unlink(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def close(self) -> None:
        """Drop this rank's views (the mapping itself goes with the process: tensors may still view it)."""
        if self.rank == 0:
            self.unlink()
        self._slots = self._counters = self._lengths = self._messages = None

    # ---- waiting -----------------------------------------------------------------------------------
    def _wait(self, ready: Callable[[], bool], idle: bool = False) -> None:
        if ready():
            return
        spins = 0
        start = last_check = time.monotonic()
        while not ready():
            spins += 1
            if self.oversubscribed:
                # more threads than CPUs: the rank we wait for may need this CPU
                os.sched_yield()
            if spins > (200 if idle else 20000):
                now = time.monotonic()
                # sleep in growing steps: 50 us at first, 1 ms after a second of waiting
                time.sleep(5e-5 if now - start < 0.01 else 2e-4 if now - start < 1 else 1e-3)
                if now - last_check > _LIVENESS_S:
                    last_check = now
                    dead = self.alive()
                    if dead is not None:
                        raise PeerDied(dead)

    # ---- collectives ---------------------------------------------------------------------------------
    def _exchange(self, flat: torch.Tensor) -> int:
        """Put this rank's bytes in its slot and wait for every rank's; returns the parity used."""
        self._seq += 1
        parity = self._seq & 1
        self._slots[parity, self.rank, : flat.numel()].copy_(flat)
        counters, seq = self._counters[0, :, 0], self._seq
        counters[self.rank] = seq
        self._wait(lambda: bool((counters >= seq).all()))
        return parity

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum ``x`` over the ranks, in place (rank order: every rank gets the same bits)."""
        flat = x.view(-1)
        step = SLOT_BYTES // x.element_size()
        for a in range(0, flat.numel(), step):
            part = flat[a : a + step]
            n = part.numel()
            parity = self._exchange(part.contiguous().view(torch.uint8))
            views = [self._slots[parity, r, : n * x.element_size()].view(x.dtype) for r in range(self.world)]
            if x.dtype in (torch.bfloat16, torch.float16):
                acc = views[0].float()
                for v in views[1:]:
                    acc += v
                part.copy_(acc)
            else:
                torch.add(views[0], views[1], out=part)
                for v in views[2:]:
                    part += v
        return x

    def gather(self, x: torch.Tensor) -> list[torch.Tensor] | None:
        """Every rank's ``x`` (same shape everywhere) on rank 0, in rank order; None on the others."""
        rows = x.reshape(x.shape[0], -1) if x.dim() > 1 else x.reshape(-1, 1)
        row_bytes = rows.shape[1] * x.element_size()
        step = max(1, SLOT_BYTES // max(1, row_bytes))
        parts: list[list[torch.Tensor]] = [[] for _ in range(self.world)]
        for a in range(0, max(1, rows.shape[0]), step):
            piece = rows[a : a + step].contiguous()
            parity = self._exchange(piece.view(-1).view(torch.uint8))
            if self.rank == 0:
                for r in range(self.world):
                    data = self._slots[parity, r, : piece.numel() * x.element_size()].view(x.dtype)
                    parts[r].append(data.view(piece.shape).clone())
        if self.rank != 0:
            return None
        return [torch.cat(p).view(x.shape) for p in parts]

    # ---- rank 0 -> the others ------------------------------------------------------------------------
    def send(self, obj: object) -> None:
        data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        if len(data) > MESSAGE_BYTES:
            raise ValueError(f"a step's inputs take {len(data)} bytes, more than {MESSAGE_BYTES}")
        sent = int(self._counters[2, 0, 0]) + 1
        # the slot of message n - 2 is free once every rank has read it
        read = self._counters[1, 1:, 0]
        self._wait(lambda: bool((read >= sent - 2).all()))
        parity = sent & 1
        self._messages[parity * MESSAGE_BYTES : parity * MESSAGE_BYTES + len(data)] = data
        self._lengths[parity] = len(data)
        self._counters[2, 0, 0] = sent

    def recv(self) -> object:
        want = self._read + 1
        sent = self._counters[2, 0]
        self._wait(lambda: int(sent[0]) >= want, idle=True)
        parity = want & 1
        n = int(self._lengths[parity])
        obj = pickle.loads(self._messages[parity * MESSAGE_BYTES : parity * MESSAGE_BYTES + n])
        self._read = want
        self._counters[1, self.rank, 0] = want
        return obj
