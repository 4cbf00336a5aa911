"""`kvloom generate` end to end, as a user runs it."""

from __future__ import annotations

import subprocess
import sys

import pytest


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
        "import sys, kvloom.cli, kvloom.backends.cpu.build; assert 'torch' not in sys.modules; "
        "from kvloom import LLM, SamplingParams; assert 'torch' in sys.modules and LLM.__name__ == 'LLM'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_python_dash_m_kvloom_and_version():
    r = subprocess.run(
        [sys.executable, "-m", "kvloom", "--version"], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0 and r.stdout.strip().startswith("kvloom ")


def test_generate_reads_the_prompt_from_stdin(stories):
    r = subprocess.run(
        [sys.executable, "-m", "kvloom", "generate", "-", "--model", str(stories), "--max-tokens", "40"],
        input="Once upon a time",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(", there was a little girl named")


def test_sampling_differs_between_runs_without_seed_and_repeats_with_one(stories):
    def sample(*extra: str) -> str:
        args = ["Once upon a time", "--model", str(stories), "--max-tokens", "40", "--temperature", "1.5"]
        r = run("generate", *args, "--ignore-eos", *extra)
        assert r.returncode == 0, r.stderr
        return r.stdout

    assert sample("--seed", "7") == sample("--seed", "7")
    assert sample() != sample()


def test_serve_takes_the_model_as_its_first_argument():
    from kvloom.cli import build_parser

    args = build_parser().parse_args(["serve", "some/model", "--port", "9"])
    assert args.model_tag == "some/model" and args.model is None
    args = build_parser().parse_args(["serve", "--model", "other"])
    assert args.model_tag is None and args.model == "other"


def test_serve_reports_a_port_in_use_before_loading_the_model(stories):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = run("serve", str(stories), "--port", str(port))
    assert r.returncode == 2 and f"--port: cannot listen on 127.0.0.1:{port}" in r.stderr, r.stderr
    assert "Loaded" not in r.stderr and "Traceback" not in r.stderr


def test_allowed_origins_take_a_json_list_or_commas():
    from kvloom.cli import _allowed_origins

    assert _allowed_origins(None) is None
    assert _allowed_origins('["*"]') == ["*"]
    assert _allowed_origins("http://a.example, http://b.example") == ["http://a.example", "http://b.example"]
    with pytest.raises(ValueError, match="--allowed-origins"):
        _allowed_origins('{"a": 1}')


def test_progress_bar_counts_tokens(stories, capsys):
    from kvloom import LLM, SamplingParams

    llm = LLM(str(stories), dtype="float32", show_progress=False)
    llm.generate(["Once upon a time"] * 4, SamplingParams(max_tokens=20, temperature=0), use_tqdm=True)
    err = capsys.readouterr().err
    assert "4/4" in err and "input" in err and "output" in err and "tok/s" in err
