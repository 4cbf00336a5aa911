"""A tensor-parallel rank other than rank 0: ``python -m kvloom.executor.worker RANK`` with the pickled
(EngineConfig, address) on stdin. Loads its slices of the model, then runs each step rank 0 sends."""

from __future__ import annotations

import pickle
import sys

from kvloom.logger import init_logger

logger = init_logger("kvloom.worker")


def run_rank(config, rank: int, addr: str, local: int) -> None:  # noqa: ANN001 - EngineConfig
    from kvloom.distributed.parallel_state import close_tensor_parallel
    from kvloom.executor.executor import join_tensor_parallel
    from kvloom.worker.model_runner import ModelRunner

    config = join_tensor_parallel(config, rank, addr, local)
    try:
        ModelRunner(config, show_progress=False).serve_peer()
    finally:
        close_tensor_parallel()


def main() -> int:
    rank = int(sys.argv[1])
    config, addr, local = pickle.load(sys.stdin.buffer)
    try:
        run_rank(config, rank, addr, local)
    except KeyboardInterrupt:
        return 130
    except Exception:
        logger.exception("tensor parallel rank %d failed", rank)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
