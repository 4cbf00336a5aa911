"""The CUDA backend: its Triton paged attention inside the engine (under Triton's interpreter on CPU tensors
where there is no GPU), device and pool options, and, marked ``cuda``, the whole engine on a GPU."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import Gemma3TextConfig, LlamaConfig, Qwen3Config

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before the kernel module is imported (triton.jit reads it)
pytest.importorskip("triton")

from kvloom import LLM, SamplingParams  # noqa: E402
from kvloom.backends.cuda.attention import TritonAttention  # noqa: E402
from kvloom.backends.cuda.backend import give_triton_kernels, gpu_kv_budget  # noqa: E402
from kvloom.models.llama import Attention  # noqa: E402

from ..models.reference import hf_greedy, random_prompts, save_random_model  # noqa: E402
from ..models.test_tiny_models import COMMON  # noqa: E402

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
CONFIGS = {
    "llama": lambda: LlamaConfig(**COMMON),
    "qwen3": lambda: Qwen3Config(**COMMON),  # per-head q/k norms through the Triton RMSNorm
    # local (window 8) and global layers: block tables per KV group, null entries before the window
    "gemma3": lambda: Gemma3TextConfig(
        **{**COMMON, "num_hidden_layers": 3},
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
    ),
}


def _on_triton(llm: LLM) -> LLM:
    """The engine's attention, norms and activations swapped for the Triton kernels, as CudaBackend has
    them (on this host's device)."""
    attention = TritonAttention()
    llm.engine.runner.backend.attention = attention
    for module in llm.engine.runner.model.modules():
        if isinstance(module, Attention):
            module.impl = attention
    give_triton_kernels(llm.engine.runner.model)
    return llm


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_triton_attention_in_the_engine_equals_the_reference(family, tmp_path, stories):
    """Greedy tokens equal and logprobs within 1e-3 (fp32), chunked prefills and decodes mixed."""
    save_random_model(CONFIGS[family](), tmp_path, stories)
    prompts = random_prompts(3, [5, 30, 21], 512, seed=7)
    params = SamplingParams(temperature=0, max_tokens=10, logprobs=0, ignore_eos=True)
    runs = []
    for triton_attention in (False, True):
        llm = LLM(
            str(tmp_path), dtype="float32", backend="torch", max_num_batched_tokens=16, show_progress=False
        )
        if triton_attention:
            _on_triton(llm)
        runs.append(llm.generate(prompts, params, use_tqdm=False))
    for ref, got in zip(*runs, strict=True):
        a, b = ref.outputs[0], got.outputs[0]
        assert a.token_ids == b.token_ids
        for la, lb, t in zip(a.logprobs, b.logprobs, a.token_ids, strict=True):
            assert abs(la[t].logprob - lb[t].logprob) < 1e-3


class RerunGraph:
    """A captured forward replayed by running it again on the static buffers (there is no CUDA here)."""

    replays = 0

    @staticmethod
    def new_pool():  # noqa: ANN205
        return None

    def capture(self, fn, pool):  # noqa: ANN001, ANN201
        self.fn = fn
        return fn()

    def replay(self):  # noqa: ANN201
        RerunGraph.replays += 1
        return self.fn()


def _cuda_backend_here(monkeypatch, graphs: bool) -> None:  # noqa: ANN001
    """The engine gets a CudaBackend on this host's device: Triton attention, norms and activation, and
    with ``graphs`` the decode graphs (RerunGraph)."""
    import kvloom.worker.model_runner as model_runner
    from kvloom.backends.cuda.backend import CudaBackend

    def backend(config):  # noqa: ANN001, ANN202
        b = CudaBackend(config)
        b.use_graphs, b.graph_type = graphs, RerunGraph
        return b

    monkeypatch.setattr(model_runner, "get_backend", backend)


@pytest.mark.parametrize("family", ["llama", "gemma3"])  # one KV group; six with null entries
def test_decode_graphs_equal_eager_steps(family, tmp_path, stories, monkeypatch):
    """Decode steps through the graphs' static buffers (padded to the captured sizes 1, 2, 4, 8, the
    padding rows in the spare block, stale table columns left behind) give the eager steps' tokens and
    logprobs; prefill chunks stay eager."""
    from kvloom.backends.cuda.graphs import capture_sizes

    assert capture_sizes(8) == [1, 2, 4, 8]
    assert capture_sizes(20) == [1, 2, 4, 8, 16, 20]
    assert capture_sizes(1000)[-1] == 512
    save_random_model(CONFIGS[family](), tmp_path, stories)
    prompts = random_prompts(5, [5, 30, 21, 3, 12], 512, seed=7)
    params = [
        SamplingParams(temperature=0, max_tokens=m, logprobs=0, ignore_eos=True) for m in (12, 4, 9, 7, 3)
    ]
    runs = []
    for graphs in (False, True):
        _cuda_backend_here(monkeypatch, graphs)
        llm = LLM(
            str(tmp_path),
            dtype="float32",
            max_num_batched_tokens=16,
            max_num_seqs=8,
            max_model_len=160,  # 10 blocks: 1 split per decode row in the graphs
            show_progress=False,
        )
        runner = llm.engine.runner
        assert (runner.backend.graphs is not None) == graphs
        assert runner.kv_cache.shape[3] == runner.num_blocks + graphs  # the spare block
        RerunGraph.replays = 0
        runs.append(llm.generate(prompts, params, use_tqdm=False))
        assert (RerunGraph.replays > 5) == graphs
    for ref, got in zip(*runs, strict=True):
        a, b = ref.outputs[0], got.outputs[0]
        assert a.token_ids == b.token_ids
        for la, lb, t in zip(a.logprobs, b.logprobs, a.token_ids, strict=True):
            assert abs(la[t].logprob - lb[t].logprob) < 1e-4


def test_device_and_pool_options():
    from kvloom.engine_args import create_engine_config

    assert gpu_kv_budget(free=60 << 30, total=80 << 30, utilization=0.9) == 52 << 30
    assert gpu_kv_budget(free=4 << 30, total=80 << 30, utilization=0.9) == 0
    config = create_engine_config(device="auto")
    assert config.device.device == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        create_engine_config(gpu_memory_utilization=1.5)
    with pytest.raises(ValueError, match="device"):
        create_engine_config(device="tpu")


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_gpu_greedy_equals_transformers(family, tmp_path, stories):
    """fp32 on the GPU: token-exact against transformers on the same GPU."""
    hf_model = save_random_model(CONFIGS[family](), tmp_path, stories).to("cuda")
    prompts = random_prompts(4, [3, 17, 40, 90], 512, seed=1)
    expected = hf_greedy(hf_model, prompts, 32)
    llm = LLM(str(tmp_path), dtype="float32", device="cuda", show_progress=False)
    assert llm.engine.runner.backend.attention.name == TritonAttention.name
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=32), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_triton_norm_and_activation_follow_pytorch(dtype):
    from kvloom.backends.cuda.fused import TritonActMul, TritonRMSNorm
    from kvloom.layers.mlp import MLP
    from kvloom.layers.norm import RMSNorm

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(0)
    x, res = (torch.randn(5, 96, generator=g).to(dtype).to(dev) for _ in range(2))
    norm = RMSNorm(96, 1e-6).to(dtype).to(dev)
    norm.weight.data = torch.randn(96, generator=g).to(dtype).to(dev)
    ref_out, ref_res = norm(x, res.clone())
    got_res = res.clone()
    got = TritonRMSNorm()(x, got_res, norm.kernel_weight, norm.eps)
    # NOTE: bf16 within 2e-2: the interpreter casts fp32 to bf16 by truncation (the residual sums then
    # differ in their last bit), a GPU rounds to nearest
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert torch.allclose(got_res.float(), ref_res.float(), rtol=tol, atol=0)
    assert (got - ref_out).abs().max() <= tol * ref_out.abs().max()
    gate_up = torch.randn(5, 2 * 80, generator=g).to(dtype).to(dev)
    for act in ("silu", "gelu_pytorch_tanh"):
        gate, up = gate_up.split(80, dim=-1)
        ref = MLP.ACTIVATIONS[act](gate) * up
        assert (TritonActMul(act)(gate_up) - ref).abs().max() <= tol * ref.abs().max()
