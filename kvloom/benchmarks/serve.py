"""A load generator for any OpenAI-compatible server (kvloom, vLLM, ...): streaming completions at a
Poisson request rate or a fixed concurrency; TTFT, TPOT, ITL and end-to-end percentiles; goodput under SLOs.

Prompts are random token ids sent as a token-id prompt (kvloom and vLLM accept them), with ignore_eos so
every request produces exactly its output length.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
from tqdm.auto import tqdm

from kvloom.benchmarks.common import percentiles, random_lengths, random_prompts


@dataclass
class RequestResult:
    ok: bool = False
    error: str = ""
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)  # gaps between streamed chunks
    output_tokens: int = 0
    sent: float = 0.0  # when it was sent, seconds after the first timed request

    @property
    def tpot(self) -> float | None:
        return (self.e2e - self.ttft) / (self.output_tokens - 1) if self.output_tokens > 1 else None


async def _one(client: httpx.AsyncClient, url: str, body: dict, headers: dict) -> RequestResult:
    r = RequestResult()
    t0 = time.perf_counter()
    last = None
    try:
        async with client.stream("POST", url, json=body, headers=headers) as resp:
            if resp.status_code != 200:
                r.error = f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"
                return r
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                now = time.perf_counter()
                if chunk.get("usage"):
                    r.output_tokens = chunk["usage"]["completion_tokens"]
                if not chunk.get("choices"):
                    continue
                if last is None:
                    r.ttft = now - t0
                else:
                    r.itl.append(now - last)
                last = now
        r.e2e = time.perf_counter() - t0
        r.ok = r.output_tokens > 0
        if not r.ok:
            r.error = "no usage in the stream"
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        r.error = f"{type(e).__name__}: {e}"
    return r


async def run(
    base_url: str,
    model: str | None,
    num_prompts: int,
    input_len: int,
    output_len: int,
    request_rate: float = float("inf"),
    max_concurrency: int | None = None,
    range_ratio: float = 0.0,
    vocab_size: int = 30000,
    api_key: str | None = None,
    slo_ttft_ms: float | None = None,
    slo_tpot_ms: float | None = None,
    seed: int = 0,
    num_warmups: int = 1,
    show_progress: bool = True,
) -> dict[str, Any]:
    """`num_warmups` requests (prompts of their own, not timed) go first, one at a time, so that first-use
    costs (memory first touched, lazy set-up) are not one of the timed requests' TTFT; vLLM's benchmark
    sends one such test prompt. NOTE: a server with prefix caching keeps the prompts of a run: give each
    run on one server its own `seed`, or the next run's prefills are cache hits."""
    rng = random.Random(seed)
    in_lens = random_lengths(num_prompts, input_len, range_ratio, rng)
    out_lens = random_lengths(num_prompts, output_len, range_ratio, rng)
    prompts = random_prompts(in_lens, vocab_size, rng)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    url = base_url.rstrip("/") + "/v1/completions"
    limit = asyncio.Semaphore(max_concurrency or num_prompts)
    bar = tqdm(total=num_prompts, desc="requests", disable=not show_progress)
    timeout = httpx.Timeout(None, connect=30)
    limits = httpx.Limits(max_connections=max_concurrency or num_prompts)

    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        if model is None:
            resp = await client.get(base_url.rstrip("/") + "/v1/models", headers=headers)
            if resp.status_code != 200:
                raise ValueError(
                    f"cannot list models at {base_url}: HTTP {resp.status_code}: {resp.text[:200]}"
                )
            model = resp.json()["data"][0]["id"]

        warm_rng = random.Random(f"warm-up {seed}")
        for prompt in random_prompts([input_len] * num_warmups, vocab_size, warm_rng):
            body = {"model": model, "prompt": prompt, "max_tokens": 4, "ignore_eos": True, "stream": True}
            body["stream_options"] = {"include_usage": True}
            warm = await _one(client, url, body, headers)
            if not warm.ok:
                raise ValueError(f"the warm-up request failed: {warm.error}")

        async def send(prompt: list[int], out_len: int) -> RequestResult:
            body = {
                "model": model,
                "prompt": prompt,
                "max_tokens": out_len,
                "temperature": 0,
                "ignore_eos": True,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            async with limit:
                sent = time.perf_counter() - t0
                result = await _one(client, url, body, headers)
                result.sent = sent
            bar.update(1)
            return result

        tasks = []
        t0 = time.perf_counter()
        for prompt, out_len in zip(prompts, out_lens, strict=True):
            tasks.append(asyncio.create_task(send(prompt, out_len)))
            if request_rate != float("inf"):
                await asyncio.sleep(rng.expovariate(request_rate))  # Poisson arrivals
        results = await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - t0
    bar.close()

    ok = [r for r in results if r.ok]
    good = [
        r
        for r in ok
        if (slo_ttft_ms is None or r.ttft * 1000 <= slo_ttft_ms)
        and (slo_tpot_ms is None or (r.tpot or 0.0) * 1000 <= slo_tpot_ms)
    ]
    ms = lambda xs: {k: v * 1000 for k, v in percentiles(xs).items()}  # noqa: E731
    return {
        "model": model,
        "num_prompts": num_prompts,
        "request_rate": request_rate,
        "max_concurrency": max_concurrency,
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
        "elapsed_s": elapsed,
        "request_throughput": len(ok) / elapsed,
        "output_throughput": sum(r.output_tokens for r in ok) / elapsed,
        "total_token_throughput": (sum(r.output_tokens for r in ok) + sum(in_lens)) / elapsed,
        "goodput": len(good) / elapsed,
        "ttft_ms": ms([r.ttft for r in ok]),
        "tpot_ms": ms([r.tpot for r in ok if r.tpot is not None]),
        "itl_ms": ms([x for r in ok for x in r.itl]),
        "e2e_ms": ms([r.e2e for r in ok]),
        # each request, in the order sent: to find what an outlier met (what arrived with it)
        "requests": [
            {
                "sent_s": round(r.sent, 4),
                "input_tokens": n,
                "output_tokens": r.output_tokens,
                "ttft_ms": round(r.ttft * 1000, 2),
                "e2e_ms": round(r.e2e * 1000, 2),
                "max_itl_ms": round(max(r.itl, default=0.0) * 1000, 2),
                "error": r.error,
            }
            for r, n in zip(results, in_lens, strict=True)
        ],
    }


def format_result(res: dict[str, Any]) -> str:
    lines = [
        f"completed {res['completed']}/{res['num_prompts']} in {res['elapsed_s']:.2f}s "
        f"({res['failed']} failed){': ' + '; '.join(res['errors']) if res['errors'] else ''}",
        f"request throughput {res['request_throughput']:.2f} req/s, "
        f"output {res['output_throughput']:.1f} tok/s, total {res['total_token_throughput']:.1f} tok/s, "
        f"goodput {res['goodput']:.2f} req/s",
        f"{'ms':<6}{'mean':>10}{'p50':>10}{'p90':>10}{'p99':>10}",
    ]
    for name in ("ttft", "tpot", "itl", "e2e"):
        p = res[f"{name}_ms"]
        lines.append(f"{name:<6}{p['mean']:>10.1f}{p['p50']:>10.1f}{p['p90']:>10.1f}{p['p99']:>10.1f}")
    return "\n".join(lines)
