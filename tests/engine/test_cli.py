"""`kvloom generate` end to end, as a user runs it."""

from __future__ import annotations

import subprocess
import sys


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kvloom.cli", *args], capture_output=True, text=True, timeout=120
    )


def test_generate_streams_text_and_stops(stories):
    r = run("generate", "Once upon a time", "--model", str(stories), "--max-tokens", "40", "--stop", "Lily")
    assert r.returncode == 0, r.stderr
    assert r.stdout == ", there was a little girl named \n"
    assert "KV cache:" in r.stderr and "finish_reason=stop" in r.stderr


def test_generate_reports_bad_input_without_a_traceback(stories):
    r = run("generate", "hi", "--model", "/nonexistent")
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr
    r = run("generate", "hi", "--model", str(stories), "--temperature", "-1")
    assert r.returncode == 2 and "temperature" in r.stderr and "Traceback" not in r.stderr


def test_help():
    r = run("generate", "--help")
    assert r.returncode == 0 and "--max-tokens" in r.stdout and "--chat" in r.stdout


def test_kv_pool_is_reserved_by_serve_and_benchmarks_not_by_generate():
    """A one-shot `generate` starts fast (pages as used); a server and the offline benchmarks write the pool
    at start-up, as vLLM and llama.cpp do. Either way can be asked for."""
    from kvloom.cli import build_parser, engine_kwargs

    p = build_parser()
    reserve = {
        cmd: engine_kwargs(p.parse_args(cmd.split()))["reserve_kv_cache"]
        for cmd in (
            "generate hi",
            "serve",
            "bench throughput",
            "bench latency",
            "generate hi --reserve-kv-cache",
        )
    }
    assert reserve == {
        "generate hi": False,
        "serve": True,
        "bench throughput": True,
        "bench latency": True,
        "generate hi --reserve-kv-cache": True,
    }
    assert engine_kwargs(p.parse_args(["serve", "--no-reserve-kv-cache"]))["reserve_kv_cache"] is False


def test_cli_import_leaves_torch_for_later():
    """`kvloom generate` starts a first start's kernel compile before torch is imported (kvloom.cli and the
    package itself load without torch; the package's names load on first use)."""
    code = (
        "import sys, kvloom.cli, kvloom.kernel_build; assert 'torch' not in sys.modules; "
        "from kvloom import LLM, SamplingParams; assert 'torch' in sys.modules and LLM.__name__ == 'LLM'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
