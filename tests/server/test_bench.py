"""`kvloom bench`: the serve load generator against a real server, and the offline benchmarks."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import pytest

from kvloom import LLM
from kvloom.benchmarks import offline, serve

from .conftest import API_KEY


def test_serve_load_generator_against_a_real_server(server):
    res = asyncio.run(
        serve.run(
            server.url,
            None,
            num_prompts=12,
            input_len=16,
            output_len=8,
            request_rate=40.0,
            vocab_size=512,
            api_key=API_KEY,
            slo_ttft_ms=60_000,
            slo_tpot_ms=0.001,
            seed=1,
            show_progress=False,
        )
    )
    assert res["model"] == "stories-chat"
    assert res["completed"] == 12 and res["failed"] == 0, res["errors"]
    assert res["output_throughput"] > 0 and res["request_throughput"] > 0
    assert 0 < res["ttft_ms"]["p50"] <= res["ttft_ms"]["p99"] <= res["e2e_ms"]["p99"]
    assert res["tpot_ms"]["mean"] > 0 and res["itl_ms"]["p50"] >= 0
    assert res["goodput"] == 0  # nothing meets a 1 us TPOT
    reqs = res["requests"]
    assert len(reqs) == 12 and all(r["output_tokens"] == 8 and not r["error"] for r in reqs)
    assert [r["sent_s"] for r in reqs] == sorted(r["sent_s"] for r in reqs)
    ttfts = sorted(r["ttft_ms"] for r in reqs)
    assert ttfts[0] <= res["ttft_ms"]["p50"] <= res["ttft_ms"]["p99"] <= ttfts[-1] + 0.01
    with pytest.raises(ValueError, match="401"):
        asyncio.run(
            serve.run(
                server.url,
                None,
                num_prompts=1,
                input_len=4,
                output_len=2,
                api_key="wrong",
                show_progress=False,
            )
        )
    with pytest.raises(ValueError, match="warm-up request failed: HTTP 401"):  # as vLLM's test prompt
        asyncio.run(serve.run(server.url, "stories-chat", 2, 4, 2, api_key="wrong", show_progress=False))
    bad = asyncio.run(
        serve.run(
            server.url,
            "stories-chat",
            num_prompts=2,
            input_len=4,
            output_len=2,
            vocab_size=512,
            api_key="wrong",
            num_warmups=0,
            show_progress=False,
        )
    )
    assert bad["failed"] == 2 and "401" in bad["errors"][0]


def test_bench_serve_cli_writes_json(server, tmp_path):
    out = tmp_path / "serve.json"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "kvloom.cli",
            "bench",
            "serve",
            "--base-url",
            server.url,
            "--num-prompts",
            "6",
            "--input-len",
            "12",
            "--output-len",
            "6",
            "--max-concurrency",
            "2",
            "--vocab-size",
            "512",
            "--api-key",
            API_KEY,
            "--output-json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert "completed 6/6" in r.stdout and "ttft" in r.stdout
    result = json.loads(out.read_text())["result"]
    assert result["completed"] == 6 and result["max_concurrency"] == 2


def test_offline_throughput_and_latency(stories):
    llm = LLM(str(stories), dtype="float32", show_progress=False)
    prompts, out_lens = offline.make_workload(8, 20, 10, vocab_size=512, range_ratio=0.5, seed=2)
    assert len({len(p) for p in prompts}) > 1 and all(10 <= len(p) <= 30 for p in prompts)
    tp = offline.throughput(llm, prompts, out_lens)
    assert tp["requests"] == 8 and tp["output_tok_s"] > 0 and tp["total_tok_s"] > tp["output_tok_s"]
    lat = offline.latency(llm, batch_size=4, input_len=16, output_len=6, num_iters=2)
    assert lat["batch_size"] == 4 and lat["prefill_s"]["p50"] > 0 and lat["decode_step_s"]["p50"] > 0
    assert lat["e2e_s"]["p50"] >= lat["prefill_s"]["p50"]


def test_bench_latency_cli_reports_speculation(stories, tmp_path):
    """With the target as its own draft every proposal is accepted: more tokens than steps, and the
    acceptance counters in the output."""
    out = tmp_path / "latency.json"
    args = ["--model", str(stories), "--dtype", "float32", "--batch-size", "2", "--input-len", "16"]
    args += ["--output-len", "24", "--num-iters", "1", "--output-json", str(out)]
    spec = ["--speculative-method", "draft", "--speculative-quantization", "none"]
    spec += ["--num-speculative-tokens", "3", "--no-adaptive-speculation"]
    r = subprocess.run(
        [sys.executable, "-m", "kvloom.cli", "bench", "latency", *args, *spec],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert "decode step" in r.stdout and "prefill" in r.stdout  # the summary table before the JSON
    result = json.loads(out.read_text())["result"]
    spec_stats = result["speculation"]
    assert spec_stats["num_draft_tokens"] > 0 and spec_stats["acceptance_rate"] == 1.0
    assert spec_stats["acceptance_per_position"] == [1.0, 1.0, 1.0]
    # about four tokens per request per decode step (counted, not timed: a timing ratio failed on a busy
    # machine)
    assert result["decode_tokens"] > 2.5 * 2 * result["decode_steps"]


def test_bench_needs_nothing_beyond_the_install():
    """`kvloom bench serve` imports httpx: a dependency of kvloom itself, not only of the tests."""
    import tomllib
    from pathlib import Path

    project = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())["project"]
    assert any(d.startswith("httpx") for d in project["dependencies"])
    assert not any(d.startswith("httpx") for d in project["optional-dependencies"]["test"])
