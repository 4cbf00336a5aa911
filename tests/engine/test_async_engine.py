"""AsyncEngine built from a factory on its own thread (how `kvloom serve` runs it)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from kvloom import RequestOutputKind, SamplingParams
from kvloom.async_engine import AsyncEngine
from kvloom.engine import LLMEngine


def test_factory_builds_on_the_engine_thread_and_serves(stories):
    built_on = []

    def build() -> LLMEngine:
        built_on.append(threading.current_thread().name)
        return LLMEngine.from_args(str(stories), dtype="float32", show_progress=False)

    engine = AsyncEngine(build)
    assert engine.engine is None
    engine.start()
    try:
        assert built_on == ["kvloom-engine"] and engine.engine is not None

        async def run() -> list[int]:
            params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
            outs = [o async for o in await engine.add("r", "Once upon a time", params)]
            return outs[-1].outputs[0].token_ids

        assert len(asyncio.run(run())) == 5

        async def close_early() -> tuple[int, bool]:
            params = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)
            stream = await engine.add("long", "Once upon a time", params, output_kind=RequestOutputKind.DELTA)
            first = await stream.__anext__()
            stream.close()  # the reader goes away: the request is aborted, not run to its end
            for _ in range(100):
                await asyncio.sleep(0.02)
                if not engine.engine.has_unfinished_requests():
                    break
            return len(first.outputs[0].token_ids), engine.engine.has_unfinished_requests()

        num_first, unfinished = asyncio.run(close_early())
        assert num_first >= 1 and not unfinished

        async def bad() -> None:
            await engine.add("bad", [10**6], SamplingParams())  # refused on the engine thread

        with pytest.raises(ValueError, match="outside the vocabulary"):
            asyncio.run(bad())
    finally:
        engine.shutdown()


def test_factory_errors_reach_start():
    def build() -> LLMEngine:
        raise ValueError("model: no such file")

    engine = AsyncEngine(build)
    with pytest.raises(ValueError, match="no such file"):
        engine.start()
    assert not engine.is_running
