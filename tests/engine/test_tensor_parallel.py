"""Tensor parallel: TP > 1 gives TP = 1's greedy tokens (fp32), bf16 within vLLM's logprob tolerance,
options checked before loading, a dead rank is an error (never a hang), two nodes through the server."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import pytest
import torch
from transformers import (
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    Phi3Config,
    Qwen2Config,
    Qwen2MoeConfig,
    Qwen3Config,
)

from kvloom import LLM, SamplingParams
from kvloom.distributed.parallel_state import rank_device
from kvloom.engine_args import create_engine_config
from tests.models.reference import hf_greedy, random_prompts, save_random_model
from tests.server.conftest import Server, free_port

COMMON = dict(
    vocab_size=509,  # not a multiple of the ranks: the last rank's vocabulary slice is padded
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,  # at TP = 4 each KV head is replicated on two ranks
    head_dim=16,
    max_position_embeddings=256,
    bos_token_id=1,
    eos_token_id=2,
)
CONFIGS = {
    "llama-bias": lambda: LlamaConfig(**COMMON, attention_bias=True, mlp_bias=True),
    "mistral-sliding-window": lambda: MistralConfig(**COMMON, sliding_window=8),
    "qwen2-tied": lambda: Qwen2Config(**COMMON, tie_word_embeddings=True),
    "qwen3": lambda: Qwen3Config(**COMMON),
    "phi3-fused-checkpoint": lambda: Phi3Config(**COMMON, pad_token_id=0),  # q/k/v and gate/up split per rank
    # each rank holds its share of every expert's MLP; one sum over the ranks after the experts
    "mixtral": lambda: MixtralConfig(**COMMON, num_local_experts=4, num_experts_per_tok=2),
    "qwen2-moe-shared-expert": lambda: Qwen2MoeConfig(
        **COMMON,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=64,
    ),
    "gemma3": lambda: Gemma3TextConfig(
        **{**COMMON, "num_hidden_layers": 3},
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
    ),
}
PROMPT_LENGTHS = [1, 3, 7, 12, 20, 33, 50, 90]


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def tiny(request, tmp_path_factory, stories):
    folder = tmp_path_factory.mktemp(f"tp-{request.param}")
    hf_model = save_random_model(CONFIGS[request.param](), folder, stories)
    prompts = random_prompts(8, PROMPT_LENGTHS, COMMON["vocab_size"], seed=1)
    return request.param, folder, prompts, hf_greedy(hf_model, prompts, 24)


def _greedy(model, tp: int, prompts, max_tokens: int, **kwargs) -> list:
    llm = LLM(None if model is None else str(model), tensor_parallel_size=tp, show_progress=False, **kwargs)
    try:
        return llm.generate(prompts, SamplingParams(temperature=0, max_tokens=max_tokens, logprobs=5))
    finally:
        llm.engine.shutdown()


@pytest.mark.parametrize("tp", [2, 4])
def test_tiny_models_greedy_equal_at_tp(tiny, tp):
    name, folder, prompts, expected = tiny
    # chunked prefill (16-token budget) and whole prompts in one run: decodes and prefills share steps
    outs = _greedy(folder, tp, prompts, 24, dtype="float32", max_num_batched_tokens=16)
    got = [o.outputs[0].token_ids for o in outs]
    assert got == expected, f"{name} at TP={tp}"


def _tokens(outs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outs]


def test_stories_tp2_fp32_equal_and_bf16_close(stories):
    prompts = ["Once upon a time", "The little dog", "Lily wanted to", "One day, a big"]
    one = _greedy(stories, 1, prompts, 40, dtype="float32")
    two = _greedy(stories, 2, prompts, 40, dtype="float32")
    assert _tokens(one) == _tokens(two)
    # bf16: equal until the first mismatch, where each side's token is in the other's top 5 (as vLLM's
    # check_logprobs_close)
    _assert_close(
        _greedy(stories, 1, prompts, 40, dtype="bfloat16"), _greedy(stories, 2, prompts, 40, dtype="bfloat16")
    )


def _assert_close(one, other) -> None:
    """Equal until the first mismatch, where each side's token is in the other's top 5."""
    for a, b in zip(one, other, strict=True):
        a, b = a.outputs[0], b.outputs[0]
        for i, (x, y) in enumerate(zip(a.token_ids, b.token_ids, strict=True)):
            if x != y:
                assert x in b.logprobs[i] and y in a.logprobs[i], f"position {i}: {x} vs {y}"
                break


def test_smollm2_gguf_tp3_fp32_equal():
    """The default model, 9 heads and 3 KV heads, at TP = 3: GGUF Q4_1 blocks sliced per rank."""
    prompts = ["What is the capital of France?", "def fib(n):"]
    one = _greedy(None, 1, prompts, 16, dtype="float32", max_model_len=256)
    three = _greedy(None, 3, prompts, 16, dtype="float32", max_model_len=256)
    assert _tokens(one) == _tokens(three)


def test_smollm2_gguf_tp3_quantized_close():
    """bf16 on the CPU kernels, the Q4_1 blocks run as they are, each rank its rows / block columns."""
    prompts = ["What is the capital of France?", "def fib(n):"]
    _assert_close(
        _greedy(None, 1, prompts, 16, max_model_len=256), _greedy(None, 3, prompts, 16, max_model_len=256)
    )


def _config_only(tmp_path, **kw):
    LlamaConfig(**{**COMMON, **kw}).save_pretrained(tmp_path)
    return tmp_path


@pytest.mark.parametrize(
    ("heads", "kv", "tp", "what"),
    [(4, 2, 3, "attention heads"), (12, 4, 6, "KV heads"), (6, 6, 4, "attention heads")],
)
def test_indivisible_shapes_refused_before_loading(tmp_path, heads, kv, tp, what):
    folder = _config_only(
        tmp_path,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        hidden_size=16 * heads,
        intermediate_size=144,
    )
    with pytest.raises(ValueError, match="tensor_parallel_size") as e:  # no weights: nothing loaded
        create_engine_config(str(folder), tensor_parallel_size=tp)
    assert what in str(e.value)


def test_parallel_options_checked(tmp_path):
    folder = _config_only(tmp_path)
    for kwargs, field in [
        ({"tensor_parallel_size": 0}, "tensor_parallel_size"),
        ({"tensor_parallel_size": 2, "nnodes": 3}, "nnodes"),
        ({"nnodes": 2, "node_rank": 2, "tensor_parallel_size": 2, "dist_init_addr": "h:1"}, "node_rank"),
        ({"nnodes": 2, "tensor_parallel_size": 2}, "dist_init_addr"),
        ({"dist_init_addr": "no-port"}, "dist_init_addr"),
        ({"tensor_parallel_size": 2, "speculative_method": "draft"}, "speculative_method"),
    ]:
        with pytest.raises(ValueError, match=field):
            create_engine_config(str(folder), **kwargs)
    if torch.cuda.device_count() < 2:  # a GPU per rank
        with pytest.raises(ValueError, match="tensor_parallel_size: 2 ranks on this host need GPUs 0..1"):
            create_engine_config(str(folder), tensor_parallel_size=2, device="cuda")


def test_each_rank_gets_its_own_gpu():
    assert [rank_device("cuda", r, 4, 8) for r in range(4)] == ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]
    assert [rank_device("cuda:2", r, 2, 4) for r in (4, 5)] == ["cuda:2", "cuda:3"]  # node 2 of 2-rank nodes
    assert rank_device("cpu", 3, 4, 0) == "cpu"
    with pytest.raises(ValueError, match="need GPUs 3..4; torch sees 4"):
        rank_device("cuda:3", 0, 2, 4)


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="fewer than 2 GPUs")
def test_gpu_tp2_greedy_equal_to_tp1(stories):
    """NCCL between two GPUs: fp32 greedy tokens equal to one GPU's."""
    prompts = ["Once upon a time", "The little dog", "Lily wanted to", "One day, a big"]
    one = _greedy(stories, 1, prompts, 40, dtype="float32", device="cuda")
    two = _greedy(stories, 2, prompts, 40, dtype="float32", device="cuda")
    assert _tokens(one) == _tokens(two)


def test_dead_rank_fails_fast(stories):
    llm = LLM(str(stories), tensor_parallel_size=2, dtype="float32", show_progress=False)
    try:
        (worker,) = llm.engine.executor.procs
        worker.kill()
        worker.wait()
        t = time.monotonic()
        with pytest.raises(RuntimeError, match="rank 1"):
            llm.generate(["Once upon a time"], SamplingParams(temperature=0, max_tokens=200))
        assert time.monotonic() - t < 10
    finally:
        llm.engine.shutdown()


def test_unreachable_rank_times_out_naming_the_address(stories):
    port = free_port()  # nobody listens there
    t = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "kvloom.cli", "serve", str(stories), "--tensor-parallel-size", "2"]
        + [
            "--nnodes",
            "2",
            "--node-rank",
            "1",
            "--dist-init-addr",
            f"127.0.0.1:{port}",
            "--dist-timeout",
            "3",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert f"127.0.0.1:{port}" in proc.stderr and "dist_timeout" in proc.stderr
    assert time.monotonic() - t < 60


def _complete(url: str, prompt: str) -> str:
    r = httpx.post(
        f"{url}/v1/completions",
        json={"model": "m", "prompt": prompt, "max_tokens": 24, "temperature": 0},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def test_two_nodes_through_the_server(stories, tmp_path):
    """Two nodes simulated on loopback (gloo between them, as between machines): the server's text
    equals one process's."""
    prompts = ["Once upon a time", "The little dog"]
    single = Server(stories, "--served-model-name", "m", log_dir=tmp_path)
    try:
        expected = [_complete(single.url, p) for p in prompts]
    finally:
        single.stop()
    addr = f"127.0.0.1:{free_port()}"
    flags = ["--tensor-parallel-size", "2", "--nnodes", "2", "--dist-init-addr", addr]
    log = open(tmp_path / "node1.log", "w+")  # noqa: SIM115
    node1 = subprocess.Popen(
        [sys.executable, "-m", "kvloom.cli", "serve", str(stories), "--dtype", "float32", *flags]
        + ["--node-rank", "1"],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        node0 = Server(stories, "--served-model-name", "m", *flags, "--node-rank", "0", log_dir=tmp_path)
        try:
            assert "gloo" in node0.output()
            assert [_complete(node0.url, p) for p in prompts] == expected
        finally:
            assert node0.stop() == 0
        assert node1.wait(timeout=30) == 0  # node 0's engine stopped its ranks
    finally:
        if node1.poll() is None:
            node1.kill()


def test_server_exits_when_a_rank_dies(stories, tmp_path):
    server = Server(stories, "--served-model-name", "m", "--tensor-parallel-size", "2", log_dir=tmp_path)
    try:
        _complete(server.url, "Once upon a time")
        os.kill(_worker_pid(server), signal.SIGKILL)
        r = httpx.post(
            f"{server.url}/v1/completions",
            json={"model": "m", "prompt": "Once", "max_tokens": 200, "temperature": 0},
            timeout=30,
        )
        assert r.status_code == 503, r.text
        assert server.proc.wait(timeout=30) == 1, server.output()
    finally:
        if server.proc.poll() is None:
            server.proc.kill()


def _worker_pid(server: Server) -> int:
    """The server's worker process (python -m kvloom.executor.worker)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = open(f"/proc/{entry}/stat").read()  # noqa: SIM115
            cmdline = open(f"/proc/{entry}/cmdline").read()  # noqa: SIM115
        except OSError:
            continue
        if int(stat.rpartition(")")[2].split()[1]) == server.proc.pid and "kvloom.executor.worker" in cmdline:
            found.append(int(entry))
    assert len(found) == 1, found
    return found[0]


def test_under_torchrun(stories, tmp_path):
    """torchrun starts one process per rank; rank 0 serves, rank 1 runs its rank."""
    prompt = "Once upon a time"
    llm = LLM(str(stories), dtype="float32", show_progress=False)
    expected = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=24))[0].outputs[0].text
    port = free_port()
    log = open(tmp_path / "torchrun.log", "w+")  # noqa: SIM115
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    cmd = [torchrun, "--nproc-per-node", "2", "--master-port", str(free_port()), "-m", "kvloom.cli", "serve"]
    cmd += [str(stories), "--dtype", "float32", "--tensor-parallel-size", "2", "--port", str(port)]
    proc = subprocess.Popen(
        [*cmd, "--served-model-name", "m"],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while time.time() < deadline:
            assert proc.poll() is None, log.seek(0) or log.read()
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.25)
        assert _complete(url, prompt) == expected
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
