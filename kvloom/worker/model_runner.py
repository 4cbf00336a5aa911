"""SchedulerOutput -> flat input tensors -> forward -> sample -> {request_id: token}."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from kvloom.backends import get_backend
from kvloom.config import EngineConfig
from kvloom.core.kv_cache_manager import KVLayout, cdiv
from kvloom.core.scheduler import NewRequestData, SchedulerOutput
from kvloom.distributed.parallel_state import get_tp
from kvloom.layers.kv_cache import KVFormat
from kvloom.layers.sampler import SamplerOutput, SampleRow, SamplingBatch, sample
from kvloom.logger import init_logger
from kvloom.models import get_model_class
from kvloom.request import TokenLogprobs
from kvloom.spec.verify import verify
from kvloom.structured.bitmask import apply_bitmask

logger = init_logger(__name__)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _materialize(model: torch.nn.Module, device: torch.device) -> None:
    """Give the meta-device parameters and buffers uninitialized storage on ``device`` (the weights are
    loaded next). NOTE: ``Module.to_empty`` does this through ``empty_like`` on meta tensors, whose
    decomposition imports sympy: 0.5 s of start-up."""
    for module in model.modules():
        for store in (module._parameters, module._buffers):
            for name, t in store.items():
                if t is not None and t.is_meta:
                    new = torch.empty(t.shape, dtype=t.dtype, device=device)
                    store[name] = (
                        torch.nn.Parameter(new, requires_grad=False) if store is module._parameters else new
                    )


@dataclass
class ModelInput:
    """One forward's inputs, as plain data: what rank 0 sends the other tensor-parallel ranks each step.
    Rows are the step's tokens, the single-token queries (decodes) first."""

    input_ids: np.ndarray  # [rows] int64
    positions: np.ndarray  # [rows] int64
    slots: np.ndarray  # [groups, rows] int64: where each row's K/V go in the pool, per KV group
    query_lens: list[int]  # rows of each sequence, in row order
    block_tables: list[list[list[int]]]  # per KV group, each sequence's blocks up to its last row's
    output_rows: list[int] | None  # the rows whose hidden state is used; None: all
    logit_rows: list[int]  # rows (of the output rows) to compute logits of


@dataclass
class ModelRunnerOutput:
    # Each sampling request's new tokens: one, or after speculation the accepted proposals and one more.
    sampled: dict[str, list[int]] = field(default_factory=dict)
    logprobs: dict[str, list[TokenLogprobs]] = field(default_factory=dict)  # one per new token
    # Speculating requests: how many of their proposals were accepted.
    num_accepted: dict[str, int] = field(default_factory=dict)
    # With keep_probs: the distribution each sampled (temperature > 0) request's last token was drawn from
    # ([vocab]); greedy requests have none (their proposals are judged by the argmax alone).
    probs: dict[str, torch.Tensor] = field(default_factory=dict)
    # New prompt logprobs per request, for consecutive positions after those it already has.
    prompt_logprobs: dict[str, list[TokenLogprobs]] = field(default_factory=dict)


def num_kv_blocks(config: EngineConfig, layout: KVLayout, memory: int | None = None) -> int:
    """How many KV blocks the pool gets (each ``layout.group_size`` layers' K/V of ``block_size`` tokens):
    from the memory budget (``kv_cache_memory``, else ``memory``: the backend's), never more than
    max_num_seqs sequences can use."""
    bs = config.cache.block_size
    chunk = config.scheduler.max_num_batched_tokens or config.model.max_model_len
    blocks_per_seq = layout.blocks_per_seq(config.model.max_model_len, bs, chunk) + layout.frees_blocks
    if config.cache.num_kv_blocks is not None:
        n = config.cache.num_kv_blocks
    else:
        layer_bytes = config.kv_bytes_per_token // config.hf_config.num_hidden_layers
        n = min(
            (config.cache.kv_cache_memory or memory or 0) // (layer_bytes * layout.group_size * bs),
            config.scheduler.max_num_seqs * blocks_per_seq,
        )
    if n < blocks_per_seq:
        raise ValueError(
            f"kv_cache_memory: the KV pool holds {n} blocks of {bs} tokens, fewer than one sequence of "
            f"max_model_len={config.model.max_model_len} needs ({blocks_per_seq}); give it more memory or "
            "lower max_model_len"
        )
    return n


def load_model(config: EngineConfig, keep_quantized: bool, show_progress: bool = True) -> torch.nn.Module:
    """The model of ``config`` built on its device and loaded (this rank's slices), before any backend
    touches it; ``--quantization w8a8`` smooths it here (SmoothQuant: the backend quantizes it next)."""
    device = torch.device(config.device.device)
    model_cls = get_model_class(config.model_type)
    with torch.device("meta"), _default_dtype(config.dtype):
        model = model_cls(config.hf_config, config.model.max_model_len, config.dtype, device)
    _materialize(model, device)
    ckpt = config.checkpoint
    weights = tqdm(
        ckpt.iter_tensors(config.dtype, keep_quantized, shard=model.checkpoint_slice),
        total=ckpt.num_tensors(),
        desc=f"Loading {ckpt.path.name}",
        unit="tensor",
        disable=not show_progress,
        leave=False,
    )
    model.load_weights(weights)
    if config.model.quantization == "w8a8" and config.model.llm_int8_threshold is None:
        from kvloom.quantization.smoothquant import smooth

        smooth(model, ckpt.load_tokenizer(), config.model.max_model_len)
    return model


class ModelRunner:
    def __init__(self, config: EngineConfig, show_progress: bool = True) -> None:
        self.config = config
        self.device = torch.device(config.device.device)
        if config.parallel.num_threads is not None:
            torch.set_num_threads(config.parallel.num_threads)
        hf = config.hf_config
        self.backend = get_backend(config)
        self.tp = get_tp()
        model = load_model(config, self.backend.keep_quantized, show_progress)
        self.backend.prepare(model)
        logger.info(
            "Compute: %s on %s, %s",
            str(config.dtype).removeprefix("torch."),
            self.device,
            self.backend.describe(model),
        )
        self.model = model.eval()
        self.vocab_size = hf.vocab_size

        # Sliding-window layers get block tables of their own that free what falls out of the window
        # (core/kv_cache_manager.py); every block holds group_size layers.
        self.layout = KVLayout.of(
            [layer.self_attn.window for layer in model.model.layers],
            config.model.max_model_len,
            hybrid=not config.cache.disable_hybrid_kv_cache_manager,
        )
        if self.layout.num_groups > 1 or self.layout.frees_blocks:
            logger.info("KV cache: %s", self.layout.describe())
        memory = None
        if config.cache.kv_cache_memory is None and config.cache.num_kv_blocks is None:
            memory = self.backend.kv_cache_memory()  # the CUDA backend: from free GPU memory
        # NOTE: the least over the tensor-parallel ranks: rank 0 schedules for all, and free GPU memory
        # differs between GPUs
        self.num_blocks = self.tp.min(num_kv_blocks(config, self.layout, memory))
        fmt = KVFormat.of(config.cache.kv_cache_dtype)  # a one-byte cache: rows of D bytes and a scale
        shape = (
            self.layout.group_size,
            2,
            config.num_local_kv_heads,  # head-major: a head's blocks are rows the attention gathers whole
            self.num_blocks,
            config.cache.block_size,
            config.head_dim if fmt is None else fmt.row_bytes(config.head_dim),
        )
        self.kv_cache = self.backend.allocate_kv_cache(shape, config.dtype if fmt is None else torch.uint8)
        slots = self.kv_cache.unbind(0)
        self.kv_caches = [slots[i] for i in self.layout.layer_slot]  # per layer
        self.backend.capture_graphs(self.model, self.kv_caches, self.layout.layer_group)
        self.generator = torch.Generator(self.device).manual_seed(config.model.seed)
        self.requests: dict[str, NewRequestData] = {}  # the requests the scheduler has scheduled, by id

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput, keep_probs: bool = False) -> ModelRunnerOutput:
        """Run one step; sample every request that reached its last token, verifying its proposals.
        ``keep_probs``: also return the distribution each request's token was drawn from (a draft
        model's proposals need them). With tensor parallel, the other ranks get the step's ModelInput and
        run the same forward (``serve_peer``)."""
        bs = self.config.cache.block_size
        dev = self.device
        states = self.requests
        for rid in out.finished_request_ids:
            states.pop(rid, None)
        for rid in out.preempted_request_ids:
            states.pop(rid, None)
        for s in out.scheduled:
            if s.new is not None:
                states[s.request_id] = s.new  # the runner's own from here on
                continue
            st = states[s.request_id]
            if s.new_token_ids or s.output_start != len(st.output_token_ids):
                del st.output_token_ids[s.output_start :]
                st.output_token_ids += s.new_token_ids
        # Single-token queries first: the attention batches them in one call.
        entries = sorted(out.scheduled, key=lambda s: s.num_new_tokens != 1)
        # NOTE: plain lists, one array each at the end: per-row numpy calls cost 0.1-0.15 ms of a 32-row
        # decode step (execute without the model: 400-540 -> 260-380 us).
        input_ids: list[int] = []
        positions: list[int] = []
        groups = range(self.layout.num_groups)
        slots: list[list[int]] = [[] for _ in groups]
        tables: list[list[list[int]]] = [[] for _ in groups]
        sample_rows: list[int] = []
        samplers: list[NewRequestData | SampleRow] = []
        owners: list[tuple[NewRequestData, int, list[int]]] = []  # (request, first sampler index, proposals)
        prompt_lp: list[tuple[NewRequestData, int, int, int]] = []  # (request, first row, position, count)
        row = 0
        for s in entries:
            req = states[s.request_id]
            end = s.start + s.num_new_tokens
            input_ids += req.token_ids_slice(s.start, end - s.num_spec)
            spec = s.spec_token_ids
            input_ids += spec
            positions += range(s.start, end)
            for group_slots, group_tables, blocks in zip(slots, tables, s.block_ids, strict=True):
                group_slots += [blocks[p // bs] * bs + p % bs for p in range(s.start, end)]
                group_tables.append(blocks[: cdiv(end, bs)])
            # Row r predicts the token at position start + r + 1; keep those that are prompt tokens
            # this request has no logprobs for yet (a recompute after preemption does not repeat them).
            if req.sampling_params.prompt_logprobs is not None:
                first = max(s.start + 1, req.num_prompt_logprobs + 1)
                count = min(end, req.num_prompt_tokens - 1) - first + 1
                if count > 0:
                    prompt_lp.append((req, row + first - 1 - s.start, first, count))
                    req.num_prompt_logprobs = first + count - 1
            row += s.num_new_tokens
            if s.samples:
                # Row j of the last 1 + num_spec predicts the token after proposals 1..j.
                owners.append((req, len(samplers), spec))
                for j in range(s.num_spec + 1):
                    sample_rows.append(row - 1 - s.num_spec + j)
                    samplers.append(req if j == 0 else SampleRow.of(req, spec[:j]))

        # The rows whose hidden state is used (sampled, or prompt logprobs), as llama.cpp's output ids: the
        # model returns those alone, and the fused layers skip the last layer's attention, o and MLP for
        # the others (all but 16 rows of a 2048-token prefill step). Indices below are into these rows.
        wanted = set(sample_rows)
        for _, first_row, _, count in prompt_lp:
            wanted.update(range(first_row, first_row + count))
        output_rows = None
        if len(wanted) < row:
            output_rows = sorted(wanted)
            index = {r: i for i, r in enumerate(output_rows)}
            sample_rows = [index[r] for r in sample_rows]
            prompt_lp = [(req, index[first], pos, count) for req, first, pos, count in prompt_lp]
        # One output layer call: the sampled rows, then each prompt-logprobs request's rows.
        logit_rows = list(sample_rows)
        for _, first_row, _, count in prompt_lp:
            logit_rows += range(first_row, first_row + count)
        inp = ModelInput(
            np.array(input_ids, dtype=np.int64),
            np.array(positions, dtype=np.int64),
            np.array(slots, dtype=np.int64),
            [s.num_new_tokens for s in entries],
            tables,
            output_rows,
            logit_rows,
        )
        if self.tp.size > 1:
            self.tp.send(inp)
        logits = self.forward(inp)
        result = ModelRunnerOutput()
        at = len(sample_rows)
        for request, _, first_pos, count in prompt_lp:
            result.prompt_logprobs[request.request_id] = self._prompt_logprobs(
                logits[at : at + count], request, first_pos
            )
            at += count
        if not sample_rows:
            return result
        logits = logits[: len(sample_rows)]
        if out.grammar is not None:  # structured outputs: forbidden tokens' logits to -inf
            bitmask, first = out.grammar
            logit_rows, mask_rows = [], []
            for request, i, spec in owners:
                row = first.get(request.request_id)
                if row is not None:
                    logit_rows += range(i, i + len(spec) + 1)
                    mask_rows += range(row, row + len(spec) + 1)
            apply_bitmask(logits, bitmask, logit_rows, mask_rows)
        speculating = any(spec for _, _, spec in owners)
        keep = keep_probs or speculating
        fast = not keep and self.backend.argmax_ok(logits)
        batch = (
            None
            if fast and SamplingBatch.argmax_only(samplers)
            else SamplingBatch.build(samplers, self.vocab_size, dev)
        )
        if fast and (batch is None or batch.plain_greedy):
            # Greedy without logprobs, bias or penalties: the argmax of the model-dtype logits (exact; the
            # min_tokens ban is -inf in any dtype), one pass in the backend instead of fp32 + torch.argmax.
            if batch is not None and batch.banned is not None:
                logits[batch.banned] = float("-inf")
            sampled = SamplerOutput(self.backend.argmax(logits), None, None, None, None)
        else:
            sampled = sample(logits.float(), batch, self.generator, keep_probs=keep)
        tokens = sampled.tokens.tolist()  # the one host copy per step (more only when logprobs are asked)
        emitted: list[tuple[NewRequestData, int, list[int]]] = []  # (request, first sampler index, tokens)
        replaced = False
        for request, i, spec in owners:
            new = tokens[i : i + 1]
            if spec:
                k = len(spec)
                params = request.sampling_params
                new = verify(
                    tokens[i : i + k + 1],
                    spec,
                    params.greedy,
                    sampled.probs[i : i + k + 1] if sampled.probs is not None else None,
                    out.spec_probs.get(request.request_id),
                    self._verify_generator(request),
                )
                result.num_accepted[request.request_id] = len(new) - 1
                if new != tokens[i : i + len(new)]:
                    tokens[i : i + len(new)] = new
                    replaced = True
            emitted.append((request, i, new))
            result.sampled[request.request_id] = new
            if keep_probs and not request.sampling_params.greedy:
                result.probs[request.request_id] = sampled.probs[i + len(new) - 1]
        if replaced:  # logprobs follow the tokens verification chose
            sampled = sampled.with_tokens(torch.tensor(tokens, device=dev))
        if sampled.logprob is not None:
            result.logprobs = _token_logprobs(emitted, sampled)
        return result

    @torch.inference_mode()
    def forward(self, inp: ModelInput) -> torch.Tensor | None:
        """One forward over a step's tokens: the logits of ``inp.logit_rows`` (None on tensor-parallel
        ranks but the first, and when no row wants them)."""
        dev = self.device
        hidden = self.backend.replay(inp)  # a decode step's CUDA graph
        if hidden is None:
            metas = self.backend.build_metadata(inp)  # per KV group
            hidden = self.model(
                torch.from_numpy(inp.input_ids).to(dev),
                torch.from_numpy(inp.positions).to(dev),
                self.kv_caches,
                [metas[g] for g in self.layout.layer_group],
            )
        if not inp.logit_rows:
            return None
        return self.model.compute_logits(hidden[torch.tensor(inp.logit_rows, dtype=torch.long, device=dev)])

    def serve_peer(self) -> None:
        """A tensor-parallel rank other than the first: run each step rank 0 sends until it sends None."""
        while (inp := self.tp.recv()) is not None:
            self.forward(inp)

    def _verify_generator(self, request: NewRequestData) -> torch.Generator:
        """Seeded requests draw their acceptance tests from their own generator (keyed like their
        samples), so a seeded request's output does not depend on the batch."""
        if request.sampling_params.seed is None:
            return self.generator
        key = hash((request.sampling_params.seed, request.index, request.num_output_tokens, "verify"))
        return torch.Generator(self.device).manual_seed(key & ((1 << 63) - 1))

    def _prompt_logprobs(
        self, logits: torch.Tensor, request: NewRequestData, pos: int
    ) -> list[TokenLogprobs]:
        """Logprobs of the prompt tokens at positions pos, pos + 1, ..., one per row of logits."""
        logprobs = logits.float().log_softmax(dim=-1)  # [rows, vocab]
        targets = torch.tensor(request.prompt_token_ids[pos : pos + len(logprobs)], device=logprobs.device)
        chosen = logprobs.gather(1, targets[:, None]).squeeze(1)
        ranks = (logprobs > chosen[:, None]).sum(dim=-1) + 1
        k = request.sampling_params.prompt_logprobs
        top_lp, top_ids = logprobs.topk(k, dim=-1)
        return [
            TokenLogprobs(t, lp, rk, list(zip(ids, lps, strict=True)))
            for t, lp, rk, ids, lps in zip(
                targets.tolist(),
                chosen.tolist(),
                ranks.tolist(),
                top_ids.tolist(),
                top_lp.tolist(),
                strict=True,
            )
        ]


def _token_logprobs(
    emitted: list[tuple[NewRequestData, int, list[int]]], out: SamplerOutput
) -> dict[str, list[TokenLogprobs]]:
    """Logprobs of each request's new tokens (rows i, i + 1, ... of the sampled ones)."""
    logprob, rank = out.logprob.tolist(), out.rank.tolist()
    top_ids, top_lps = out.top_ids.tolist(), out.top_logprobs.tolist()
    result = {}
    for request, i, tokens in emitted:
        params = request.sampling_params
        if not params.needs_sampled_logprob:
            continue
        n = params.logprobs or 0
        result[request.request_id] = [
            TokenLogprobs(
                t, logprob[i + j], rank[i + j], list(zip(top_ids[i + j][:n], top_lps[i + j][:n], strict=True))
            )
            for j, t in enumerate(tokens)
        ]
    return result
