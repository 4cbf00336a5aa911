"""Command line: ``kvloom generate``, ``kvloom serve`` and ``kvloom bench``."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

from kvloom.config import add_cli_args, kwargs_from_cli
from kvloom.sampling_params import SamplingParams


def add_engine_args(p: argparse.ArgumentParser, reserve_kv_cache: bool = False) -> None:
    """The engine's options, made from kvloom.config's fields. Per command: whether the KV pool is written
    at start-up (a server and the benchmarks do), and no fixed seed (sampling differs from run to run)."""
    add_cli_args(p, defaults={"reserve_kv_cache": reserve_kv_cache, "seed": None})


def engine_kwargs(args: argparse.Namespace) -> dict:
    """The parsed options as create_engine_config's keyword arguments (without the model)."""
    kwargs = kwargs_from_cli(args)
    del kwargs["model"]
    return kwargs


def _structured_outputs(args: argparse.Namespace) -> dict | None:
    """--json-schema (JSON text or @FILE), --json-object, --regex, --choice, --grammar (text or @FILE)."""

    def read(value: str) -> str:
        return Path(value[1:]).read_text() if value.startswith("@") else value

    given = {
        "json": None if args.json_schema is None else read(args.json_schema),
        "json_object": args.json_object or None,
        "regex": args.regex,
        "choice": args.choice,
        "grammar": None if args.grammar is None else read(args.grammar),
    }
    given = {k: v for k, v in given.items() if v is not None}
    return given or None


def cmd_generate(args: argparse.Namespace) -> int:
    from kvloom.llm import LLM

    params = SamplingParams(
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        max_tokens=args.max_tokens,
        stop=args.stop,
        ignore_eos=args.ignore_eos,
        structured_outputs=_structured_outputs(args),
    )
    text = sys.stdin.read() if args.prompt == "-" else args.prompt
    if not text:
        raise ValueError("prompt: empty prompt")
    llm = LLM(args.model, show_progress=True, **engine_kwargs(args))
    engine = llm.engine
    prompt = llm.apply_chat_template([{"role": "user", "content": text}]) if args.chat else text
    engine.add_request("cli", prompt, params)
    t0 = time.perf_counter()
    printed = 0
    out = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            text = out.outputs[0].text
            sys.stdout.write(text[printed:])
            sys.stdout.flush()
            printed = len(text)
    sys.stdout.write("\n")
    if out is not None:
        n = len(out.outputs[0].token_ids)
        dt = time.perf_counter() - t0
        print(
            f"[{n} tokens in {dt:.2f}s, {n / dt:.1f} tok/s, finish_reason={out.outputs[0].finish_reason}]",
            file=sys.stderr,
        )
    return 0


def _allowed_origins(value: str | None) -> list[str] | None:
    """--allowed-origins: a JSON list (vLLM's form) or comma-separated origins."""
    if not value:
        return None
    import json

    try:
        origins = json.loads(value)
    except json.JSONDecodeError:
        origins = [o.strip() for o in value.split(",") if o.strip()]
    if not isinstance(origins, list) or not all(isinstance(o, str) for o in origins):
        raise ValueError(f"--allowed-origins: expected a JSON list or comma-separated origins, got {value!r}")
    return origins


def cmd_serve(args: argparse.Namespace) -> int:
    from kvloom.server.launch import bind_socket

    if args.model_tag is not None:
        if args.model is not None and args.model != args.model_tag:
            raise ValueError(f"model: given twice ({args.model_tag!r} and --model {args.model!r})")
        args.model = args.model_tag
    origins = _allowed_origins(args.allowed_origins)
    # Machines other than node 0 (and torchrun's other ranks) run tensor-parallel ranks, no server.
    worker_node = args.node_rank > 0 or (
        "LOCAL_WORLD_SIZE" in os.environ and os.environ.get("RANK", "0") != "0"
    )
    # Before anything loads: a port in use is found in milliseconds, not after the model warmed up.
    sock = None if worker_node else bind_socket(args.host, args.port)

    from kvloom.async_engine import AsyncEngine
    from kvloom.engine import LLMEngine
    from kvloom.engine_args import create_engine_config
    from kvloom.logger import init_logger
    from kvloom.server.api import build_app
    from kvloom.server.launch import serve_app
    from kvloom.server.metrics import ServerMetrics
    from kvloom.server.tools import read_template

    logger = init_logger("kvloom.serve")
    config = create_engine_config(args.model, **engine_kwargs(args))
    if worker_node:
        from kvloom.executor.executor import run_worker_node

        logger.info(
            "Node %d: running tensor-parallel ranks for the engine at %s", args.node_rank, args.dist_init_addr
        )
        return run_worker_node(config)

    def build() -> LLMEngine:
        engine = LLMEngine(config, show_progress=True)
        logger.info("Warmed up in %.1fs", engine.warm_up())
        return engine

    name = args.served_model_name or config.checkpoint.path.stem
    metrics = ServerMetrics(name)
    # NOTE: the engine is loaded, warmed up and stepped on one thread (see kvloom/async_engine.py).
    async_engine = AsyncEngine(build, observer=metrics.observe, on_abort=metrics.count_abort)
    async_engine.start()
    app = build_app(
        async_engine,
        name,
        api_key=args.api_key or os.environ.get("KVLOOM_API_KEY"),
        max_body_bytes=args.max_body_mb << 20,
        metrics=metrics,
        allowed_origins=origins,
        chat_template=None if args.chat_template is None else read_template(args.chat_template),
        tool_call_parser=args.tool_call_parser,
    )
    logger.info("Serving %r on http://%s:%d (OpenAI API under /v1)", name, args.host, args.port)
    # NOTE: uvicorn shuts down gracefully on SIGTERM/SIGINT, then re-raises the signal to the handler that
    # was installed before it. A no-op one there makes a graceful shutdown exit with status 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    return serve_app(app, sock, async_engine, args.shutdown_timeout, args.log_level)


def cmd_bench(args: argparse.Namespace) -> int:
    import asyncio
    import json

    from kvloom.benchmarks import offline, serve
    from kvloom.benchmarks.common import write_json

    if args.bench_command == "serve":
        result = asyncio.run(
            serve.run(
                args.base_url,
                args.served_model,
                args.num_prompts,
                args.input_len,
                args.output_len,
                request_rate=args.request_rate,
                max_concurrency=args.max_concurrency,
                range_ratio=args.range_ratio,
                vocab_size=args.vocab_size,
                api_key=args.api_key,
                slo_ttft_ms=args.slo_ttft_ms,
                slo_tpot_ms=args.slo_tpot_ms,
                seed=args.seed,
                num_warmups=args.num_warmups,
            )
        )
        print(serve.format_result(result))
    else:
        from kvloom.llm import LLM

        llm = LLM(args.model, show_progress=True, **engine_kwargs(args))
        if args.bench_command == "throughput":
            prompts, out_lens = offline.make_workload(
                args.num_prompts,
                args.input_len,
                args.output_len,
                llm.engine.runner.vocab_size,
                args.range_ratio,
                args.seed,
            )
            result = offline.throughput(llm, prompts, out_lens)
        else:
            result = offline.latency(
                llm, args.batch_size, args.input_len, args.output_len, args.num_iters, args.seed
            )
        if llm.engine.proposer is not None:
            result["speculation"] = llm.engine.proposer.stats.summary()
        print(offline.format_result(result))
        print(json.dumps(result, indent=2))
    write_json(
        args.output_json,
        {"command": args.bench_command, "args": vars(args) | {"func": None}, "result": result},
    )
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from pathlib import Path

    from kvloom.quantization.compressed_tensors import write_w8a8

    out = write_w8a8(args.model, Path(args.output), args.max_model_len)
    print(f"wrote {out}; serve it with: kvloom serve --model {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from kvloom import __version__

    parser = argparse.ArgumentParser(prog="kvloom", description="kvloom: a small, exact LLM inference engine")
    parser.add_argument("--version", action="version", version=f"kvloom {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser(
        "generate",
        help="generate text for one prompt, streamed to the terminal",
        description="Generate text for one prompt and stream it to stdout.",
    )
    gen.add_argument("prompt", help="the prompt text; - reads it from standard input")
    gen.add_argument("--max-tokens", type=int, default=128, help="tokens to generate at most (default: 128)")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default: 0)")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: 1.0)")
    gen.add_argument("--top-k", type=int, default=-1, help="sample from the k likeliest tokens; -1 = off")
    gen.add_argument(
        "--ignore-eos", action="store_true", help="keep generating past the end-of-sequence token"
    )
    gen.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min_p x the top probability")
    gen.add_argument(
        "--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats (1 = off)"
    )
    gen.add_argument("--stop", action="append", default=None, help="stop string (repeat the flag for more)")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    fmt = gen.add_argument_group("structured output (one of)")
    fmt.add_argument(
        "--json-schema", default=None, help="the output follows this JSON schema (JSON text, or @FILE)"
    )
    fmt.add_argument("--json-object", action="store_true", help="the output is a JSON object")
    fmt.add_argument("--regex", default=None, help="the output matches this regular expression")
    fmt.add_argument(
        "--choice", action="append", default=None, help="the output is one of these (repeat the flag)"
    )
    fmt.add_argument(
        "--grammar", default=None, help="the output follows this EBNF/GBNF grammar (text, or @FILE)"
    )
    add_engine_args(gen)
    gen.set_defaults(func=cmd_generate)

    srv = sub.add_parser(
        "serve",
        help="serve an OpenAI-compatible HTTP API",
        description="Serve /v1/completions, /v1/chat/completions and friends over HTTP.",
    )
    srv.add_argument(
        "model_tag",
        nargs="?",
        default=None,
        metavar="MODEL",
        help="Hugging Face folder or .gguf file, as `vllm serve MODEL` (or --model; default: SmolLM2)",
    )
    srv.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    srv.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    srv.add_argument(
        "--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 (or KVLOOM_API_KEY)"
    )
    srv.add_argument(
        "--served-model-name", default=None, help="model name clients send (default: file/folder name)"
    )
    srv.add_argument(
        "--chat-template",
        default=None,
        help="a Jinja chat template file in place of the model's, or one of kvloom's, for models whose own "
        "template has no tools: chatml_tools (ChatML, Hermes <tool_call> calls), "
        "llama3_json_tools (Llama 3.1+ JSON calls), mistral_tools (Mistral [TOOL_CALLS])",
    )
    srv.add_argument(
        "--tool-call-parser",
        default=None,
        choices=("hermes", "llama3_json", "mistral"),
        help="how tool calls are read under tool_choice auto (default: what the chat template calls for)",
    )
    srv.add_argument("--max-body-mb", type=int, default=8, help="largest request body in MiB (default: 8)")
    srv.add_argument(
        "--shutdown-timeout",
        type=float,
        default=30.0,
        help="seconds SIGTERM waits for requests in flight before aborting them (default: 30)",
    )
    srv.add_argument("--log-level", default="info", help="uvicorn log level (default: info)")
    srv.add_argument(
        "--allowed-origins",
        default=None,
        help="CORS for browser clients: the origins allowed, as a JSON list ('[\"*\"]' for any) or "
        "comma-separated (default: none, no CORS headers)",
    )
    add_engine_args(srv, reserve_kv_cache=True)
    srv.set_defaults(func=cmd_serve)

    bench = sub.add_parser(
        "bench",
        help="benchmark throughput, latency, or a running server",
        description="Benchmarks: offline throughput and latency, or load on a server.",
    )
    bsub = bench.add_subparsers(dest="bench_command", required=True)
    tp = bsub.add_parser("throughput", help="N requests at once, offline: tokens per second")
    lat = bsub.add_parser("latency", help="one batch, offline: prefill and per-step decode time")
    sv = bsub.add_parser("serve", help="load an OpenAI-compatible server (kvloom, vLLM, ...)")
    for b in (tp, lat, sv):
        b.add_argument("--input-len", type=int, default=128, help="prompt tokens (default: 128)")
        b.add_argument("--output-len", type=int, default=128, help="output tokens (default: 128)")
        b.add_argument("--output-json", default=None, help="write the result here")
    for b in (tp, sv):
        b.add_argument("--num-prompts", type=int, default=100, help="requests (default: 100)")
        b.add_argument(
            "--range-ratio",
            type=float,
            default=0.0,
            help="lengths uniform in len x [1 - r, 1 + r] (default: 0, fixed)",
        )
    for b in (tp, lat):  # steady state, as the peers run it: the KV pool written before the clock starts
        add_engine_args(b, reserve_kv_cache=True)
    lat.add_argument("--batch-size", type=int, default=1, help="requests in the batch (default: 1)")
    lat.add_argument("--num-iters", type=int, default=5, help="measured iterations (default: 5)")
    sv.add_argument(
        "--base-url", default="http://127.0.0.1:8000", help="server (default: http://127.0.0.1:8000)"
    )
    sv.add_argument("--served-model", default=None, help="model name to send (default: the server's first)")
    sv.add_argument(
        "--request-rate",
        type=float,
        default=float("inf"),
        help="Poisson arrivals per second (default: inf, all at once)",
    )
    sv.add_argument("--max-concurrency", type=int, default=None, help="requests in flight at most")
    sv.add_argument("--vocab-size", type=int, default=30000, help="random prompt token ids below this")
    sv.add_argument("--api-key", default=None, help="bearer token for the server")
    sv.add_argument("--slo-ttft-ms", type=float, default=None, help="goodput: TTFT at most this")
    sv.add_argument("--slo-tpot-ms", type=float, default=None, help="goodput: TPOT at most this")
    sv.add_argument(
        "--seed",
        type=int,
        default=0,
        help="workload seed (default: 0); give each run on one server its own (prefix caching keeps prompts)",
    )
    sv.add_argument(
        "--num-warmups", type=int, default=1, help="untimed requests sent first, one at a time (default: 1)"
    )
    bench.set_defaults(func=cmd_bench)

    qz = sub.add_parser(
        "quantize",
        help="write a W8A8 checkpoint (SmoothQuant-calibrated) that later starts load as it is",
        description="Smooth (SmoothQuant, on the calibration text kvloom ships) and quantize a bf16/fp32 "
        "model as --quantization w8a8 does at start-up, and write it as a compressed-tensors W8A8 Hugging "
        "Face folder (vLLM reads the format too). Serving that folder skips the calibration.",
    )
    qz.add_argument("--model", default=None, help="Hugging Face folder or .gguf file (default: SmolLM2-135M)")
    qz.add_argument("--output", required=True, help="the folder to write")
    qz.add_argument("--quantization", default="w8a8", choices=["w8a8"], help="the scheme (default: w8a8)")
    qz.add_argument(
        "--max-model-len", type=int, default=None, help="longest calibration sequence (default: the model's)"
    )
    qz.set_defaults(func=cmd_quantize)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    runs_engine = args.command in ("generate", "serve") or getattr(args, "bench_command", None) != "serve"
    if runs_engine:
        # A first start compiles the CPU kernels (~5 s of one core): start now, before torch is imported.
        from kvloom.backends import start_build

        start_build(getattr(args, "device", "cpu"), getattr(args, "backend", "auto"))
    try:
        return args.func(args)
    except ValueError as e:
        print(f"kvloom: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
