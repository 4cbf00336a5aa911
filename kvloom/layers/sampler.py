"""Vectorized sampling over the batch: one pass over [batch, vocab] per step.

Order (as vLLM's): raw logprobs (what ``logprobs`` report) -> logit_bias and min_tokens masks ->
repetition / frequency / presence penalties -> greedy argmax, or temperature -> min_p -> top_k -> top_p
-> sample. Sampling is an exponential race, argmax(p / E) with E ~ Exp(1), so each row can draw its noise
from its own generator: a seeded request gets the same tokens whatever else is in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvloom.request import Request, TokenIds
from kvloom.sampling_params import SamplingParams

_MIN_TEMPERATURE, _MAX_TEMPERATURE = 1e-2, 1e4
_NEG_INF = float("-inf")


@dataclass
class SampleRow(TokenIds):
    """A request as the sampler sees it at a row after ``extra`` proposed tokens (speculative decoding):
    penalties, min_tokens and the seeded draw then count those tokens as already generated."""

    sampling_params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    eos_token_ids: frozenset[int]
    index: int

    @classmethod
    def of(cls, request: Request, extra: list[int]) -> SampleRow:
        return cls(
            request.sampling_params,
            request.prompt_token_ids,
            request.output_token_ids + extra,
            request.eos_token_ids,
            request.index,
        )


@dataclass
class SamplingBatch:
    """Per-row sampling state for one step, built from the requests that sample."""

    temperature: torch.Tensor  # [batch] float; 0 = greedy
    top_k: torch.Tensor  # [batch] long; vocab size when off
    top_p: torch.Tensor  # [batch] float
    min_p: torch.Tensor  # [batch] float
    all_greedy: bool
    any_top_k: bool
    any_top_p: bool
    any_min_p: bool
    # penalties; None when no row uses them
    repetition: torch.Tensor | None  # [batch]
    presence: torch.Tensor | None  # [batch]
    frequency: torch.Tensor | None  # [batch]
    prompt_tokens: torch.Tensor | None  # [batch, max_prompt] long, padded with vocab_size
    output_tokens: torch.Tensor | None  # [batch, max_output] long, padded with vocab_size
    bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None  # (rows, token ids, values)
    banned: tuple[torch.Tensor, torch.Tensor] | None  # (rows, token ids) forced to -inf (min_tokens)
    seeded: list[tuple[int, torch.Generator]]  # rows with their own generator
    unseeded_rows: torch.Tensor | None  # [num_unseeded] long; None when all rows are unseeded
    num_logprobs: int  # largest top-N asked for; -1 when no row needs logprobs

    @property
    def plain_greedy(self) -> bool:
        """Every row takes the argmax of its logits, at most with banned tokens (min_tokens) at -inf."""
        return self.all_greedy and self.num_logprobs < 0 and self.bias is None and self.repetition is None

    @staticmethod
    def argmax_only(requests: list[Request | SampleRow]) -> bool:
        """Whether the batch of these rows would be plain greedy with nothing banned, known without
        building it (its tensors cost ~0.25 ms of a 32-row decode step)."""
        for r in requests:
            p = r.sampling_params
            if p.temperature != 0.0 or p.needs_sampled_logprob or p.logit_bias or p.needs_penalties:
                return False
            if _min_tokens_ban(r):
                return False
        return True

    @classmethod
    def build(
        cls, requests: list[Request | SampleRow], vocab_size: int, device: torch.device
    ) -> SamplingBatch:
        params = [r.sampling_params for r in requests]
        t = lambda xs, dtype=torch.float32: torch.tensor(xs, dtype=dtype, device=device)  # noqa: E731
        top_k = [p.top_k if p.top_k > 0 else vocab_size for p in params]

        repetition = presence = frequency = prompt_tokens = output_tokens = None
        if any(p.needs_penalties for p in params):
            repetition = t([p.repetition_penalty for p in params])
            presence = t([p.presence_penalty for p in params])
            frequency = t([p.frequency_penalty for p in params])
            use_rep = [p.repetition_penalty != 1.0 for p in params]
            prompt_tokens = _pad(
                [r.prompt_token_ids if u else [] for r, u in zip(requests, use_rep, strict=True)], vocab_size
            )
            output_tokens = _pad([r.output_token_ids for r in requests], vocab_size)
            prompt_tokens, output_tokens = prompt_tokens.to(device), output_tokens.to(device)

        bias_rows, bias_ids, bias_vals, ban_rows, ban_ids = [], [], [], [], []
        for row, (r, p) in enumerate(zip(requests, params, strict=True)):
            for token_id, value in (p.logit_bias or {}).items():
                bias_rows.append(row)
                bias_ids.append(token_id)
                bias_vals.append(value)
            stop_ids = _min_tokens_ban(r)
            ban_rows += [row] * len(stop_ids)
            ban_ids += sorted(stop_ids)
        bias = (t(bias_rows, torch.long), t(bias_ids, torch.long), t(bias_vals)) if bias_rows else None
        banned = (t(ban_rows, torch.long), t(ban_ids, torch.long)) if ban_rows else None

        seeded = [
            (row, _generator(r, device))
            for row, r in enumerate(requests)
            if r.sampling_params.seed is not None
        ]
        unseeded_rows = None
        if seeded:
            seeded_set = {row for row, _ in seeded}
            unseeded_rows = t([row for row in range(len(requests)) if row not in seeded_set], torch.long)

        logprobs = [p.logprobs or 0 for p in params if p.needs_sampled_logprob]
        return cls(
            temperature=t([p.temperature for p in params]),
            top_k=t(top_k, torch.long),
            top_p=t([p.top_p for p in params]),
            min_p=t([p.min_p for p in params]),
            all_greedy=all(p.temperature == 0.0 for p in params),
            any_top_k=any(k < vocab_size for k in top_k),
            any_top_p=any(p.top_p < 1.0 for p in params),
            any_min_p=any(p.min_p > 0.0 for p in params),
            repetition=repetition,
            presence=presence,
            frequency=frequency,
            prompt_tokens=prompt_tokens,
            output_tokens=output_tokens,
            bias=bias,
            banned=banned,
            seeded=seeded,
            unseeded_rows=unseeded_rows,
            num_logprobs=max(logprobs) if logprobs else -1,
        )


def _min_tokens_ban(r: Request | SampleRow) -> set[int]:
    """The stop tokens a row may not sample yet: its own and (unless ignore_eos) EOS, until min_tokens.
    NOTE: none for structured outputs: the grammar decides when the output may end (a ban could leave a
    finished format no token at all)."""
    p = r.sampling_params
    if r.num_output_tokens >= p.min_tokens or p.structured_outputs is not None:
        return set()
    return set(p.stop_token_ids) | (set() if p.ignore_eos else set(r.eos_token_ids))


@dataclass
class SamplerOutput:
    tokens: torch.Tensor  # [batch] long
    # Only when some row needs logprobs (num_logprobs >= 0), else None:
    logprob: torch.Tensor | None  # [batch] raw logprob of the sampled token
    rank: torch.Tensor | None  # [batch] 1 = the most likely token
    top_ids: torch.Tensor | None  # [batch, num_logprobs]
    top_logprobs: torch.Tensor | None  # [batch, num_logprobs]
    # With keep_probs: the distribution each row was drawn from (None when all rows are greedy), and the
    # raw logprobs (None when no row needs logprobs).
    probs: torch.Tensor | None = None
    raw_logprobs: torch.Tensor | None = field(default=None, repr=False)

    def with_tokens(self, tokens: torch.Tensor) -> SamplerOutput:
        """The same rows with other tokens chosen (verification replaced some): logprobs follow them."""
        if self.raw_logprobs is None:
            return SamplerOutput(tokens, None, None, None, None, self.probs)
        return _with_logprobs(tokens, self.raw_logprobs, self.top_ids.shape[1], self.probs)


def _pad(rows: list[list[int]], pad: int) -> torch.Tensor:
    width = max((len(r) for r in rows), default=0)
    out = torch.full((len(rows), max(width, 1)), pad, dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return out


def _generator(request: Request, device: torch.device) -> torch.Generator:
    """A generator keyed by (seed, sample index, position): the same draw whenever this token is sampled,
    whatever the batch, arrival order or preemptions before it."""
    key = hash((request.sampling_params.seed, request.index, request.num_output_tokens)) & ((1 << 63) - 1)
    return torch.Generator(device).manual_seed(key)


def apply_penalties(logits: torch.Tensor, b: SamplingBatch) -> torch.Tensor:
    """Repetition (prompt + output tokens; HF/vLLM rule) and OpenAI presence/frequency (output tokens)."""
    batch, vocab = logits.shape
    counts = torch.zeros(batch, vocab + 1, dtype=logits.dtype, device=logits.device)
    counts.scatter_add_(1, b.output_tokens, torch.ones_like(b.output_tokens, dtype=logits.dtype))
    counts = counts[:, :vocab]  # the padding column drops out
    seen = torch.zeros(batch, vocab + 1, dtype=torch.bool, device=logits.device)
    seen.scatter_(1, b.prompt_tokens, True)
    seen = seen[:, :vocab] | (counts > 0)
    rep = b.repetition[:, None]
    logits = torch.where(seen, torch.where(logits > 0, logits / rep, logits * rep), logits)
    return logits - b.frequency[:, None] * counts - b.presence[:, None] * (counts > 0).to(logits.dtype)


def _truncate(logits: torch.Tensor, b: SamplingBatch) -> torch.Tensor:
    """min_p, then top_k, then top_p (on what top_k left), on temperature-scaled logits."""
    if b.any_min_p:
        probs = logits.softmax(dim=-1)
        threshold = probs.max(dim=-1, keepdim=True).values * b.min_p[:, None]
        logits = logits.masked_fill(probs < threshold, _NEG_INF)
    if b.any_top_k or b.any_top_p:
        sorted_logits, sorted_idx = logits.sort(dim=-1, descending=True)
        if b.any_top_k:
            ranks = torch.arange(logits.shape[-1], device=logits.device)[None, :]
            sorted_logits = sorted_logits.masked_fill(ranks >= b.top_k[:, None], _NEG_INF)
        if b.any_top_p:
            probs = sorted_logits.softmax(dim=-1)
            # Drop a token when the tokens ranked above it already reach top_p (the top one always stays).
            mass_before = probs.cumsum(dim=-1) - probs
            sorted_logits = sorted_logits.masked_fill(mass_before >= b.top_p[:, None], _NEG_INF)
        logits = torch.full_like(logits, _NEG_INF).scatter_(-1, sorted_idx, sorted_logits)
    return logits


def sample(
    logits: torch.Tensor, b: SamplingBatch, generator: torch.Generator | None, keep_probs: bool = False
) -> SamplerOutput:
    """logits: [batch, vocab] float32 (not modified) -> SamplerOutput."""
    raw_logprobs = logits.log_softmax(dim=-1) if b.num_logprobs >= 0 else None
    if b.bias is not None or b.banned is not None:
        logits = logits.clone()
        if b.bias is not None:
            rows, ids, values = b.bias
            logits.index_put_((rows, ids), values, accumulate=True)
        if b.banned is not None:
            logits[b.banned] = _NEG_INF
    if b.repetition is not None:
        logits = apply_penalties(logits, b)

    tokens = logits.argmax(dim=-1)
    probs = None
    if not b.all_greedy:
        is_greedy = b.temperature == 0.0
        # NOTE: the divisor is kept in [1e-2, 1e4] (vLLM clamps from below likewise): in fp32 a smaller one
        # turns the logits into inf and NaN, a larger one -inf / inf into NaN. The distributions at the
        # bounds are already one-hot (0.01) and uniform within the logits' rounding (1e4).
        divisor = torch.where(is_greedy, 1.0, b.temperature.clamp(_MIN_TEMPERATURE, _MAX_TEMPERATURE))
        scaled = logits / divisor[:, None]
        probs = _truncate(scaled, b).softmax(dim=-1)
        noise = torch.empty_like(probs)
        if b.unseeded_rows is None:
            noise.exponential_(generator=generator)
        elif len(b.unseeded_rows):
            noise[b.unseeded_rows] = torch.empty_like(noise[b.unseeded_rows]).exponential_(
                generator=generator
            )
        for row, g in b.seeded:
            noise[row].exponential_(generator=g)
        tokens = torch.where(is_greedy, tokens, (probs / noise).argmax(dim=-1))

    probs = probs if keep_probs else None
    if raw_logprobs is None:
        return SamplerOutput(tokens, None, None, None, None, probs)
    out = _with_logprobs(tokens, raw_logprobs, b.num_logprobs, probs)
    if not keep_probs:
        out.raw_logprobs = None
    return out


def _with_logprobs(
    tokens: torch.Tensor, raw_logprobs: torch.Tensor, num_logprobs: int, probs: torch.Tensor | None
) -> SamplerOutput:
    logprob = raw_logprobs.gather(1, tokens[:, None]).squeeze(1)
    rank = (raw_logprobs > logprob[:, None]).sum(dim=-1) + 1
    top_logprobs, top_ids = raw_logprobs.topk(num_logprobs, dim=-1)
    return SamplerOutput(tokens, logprob, rank, top_ids, top_logprobs, probs, raw_logprobs)
