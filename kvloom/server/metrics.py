"""Prometheus metrics, updated on the engine thread after every step."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from kvloom.engine import LLMEngine
from kvloom.outputs import RequestOutput

_LATENCY_BUCKETS = (
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
)


def _advance(counters, now, last) -> None:
    """Move Prometheus counters along with engine counters (``now``) since the last observation."""
    for c, new, old in zip(counters, now, last, strict=True):
        if new > old:
            c.inc(new - old)


class ServerMetrics:
    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry()
        labels = ["model_name"]
        r = self.registry

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, labels, registry=r).labels(model_name)

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, labels, registry=r).labels(model_name)

        def histogram(name: str, doc: str) -> Histogram:
            return Histogram(name, doc, labels, buckets=_LATENCY_BUCKETS, registry=r).labels(model_name)

        self.running = gauge("kvloom:num_requests_running", "Requests in the running batch.")
        self.waiting = gauge("kvloom:num_requests_waiting", "Requests waiting to be scheduled.")
        self.kv_usage = gauge("kvloom:kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0-1).")
        self.prompt_tokens = counter("kvloom:prompt_tokens", "Prompt tokens computed (recomputes included).")
        self.generation_tokens = counter("kvloom:generation_tokens", "Tokens generated.")
        self.preemptions = counter("kvloom:num_preemptions", "Requests preempted (KV blocks ran out).")
        self.cache_queries = counter(
            "kvloom:prefix_cache_queries", "Prompt tokens looked up in the prefix cache."
        )
        self.cache_hits = counter("kvloom:prefix_cache_hits", "Prompt tokens found in the prefix cache.")
        self._success = Counter(
            "kvloom:request_success",
            "Finished requests by finish reason.",
            ["model_name", "finished_reason"],
            registry=r,
        )
        self._aborted = Counter(
            "kvloom:request_aborted",
            "Requests aborted before they finished, by reason (client_gone, shutdown, error).",
            ["model_name", "reason"],
            registry=r,
        )
        for reason in ("client_gone", "shutdown", "error"):
            self._aborted.labels(model_name, reason)  # exported at 0 from the start
        self.model_name = model_name
        self.spec_drafts = counter("kvloom:spec_decode_num_drafts", "Verifications of proposed tokens.")
        self.spec_draft_tokens = counter("kvloom:spec_decode_num_draft_tokens", "Tokens proposed.")
        self.spec_accepted = counter("kvloom:spec_decode_num_accepted_tokens", "Proposed tokens accepted.")
        self._spec_per_pos = {
            kind: Counter(
                f"kvloom:spec_decode_num_{kind}_tokens_per_pos",
                f"Tokens {kind}, by position in the proposal (0 = first).",
                ["model_name", "position"],
                registry=r,
            )
            for kind in ("draft", "accepted")
        }
        self._spec_last = (0, 0, 0)
        self._spec_pos_last: dict[str, list[int]] = {}
        self.ttft = histogram("kvloom:time_to_first_token_seconds", "Arrival to first token.")
        self.tpot = histogram("kvloom:time_per_output_token_seconds", "Mean time between output tokens.")
        self.e2e = histogram("kvloom:e2e_request_latency_seconds", "Arrival to finish.")
        self.queue = histogram("kvloom:request_queue_time_seconds", "Arrival to first scheduled.")
        self._last = (0, 0, 0, 0, 0)  # engine counters at the last observation

    def observe(self, engine: LLMEngine, outputs: list[RequestOutput]) -> None:
        s = engine.scheduler
        self.running.set(s.num_running)
        self.waiting.set(s.num_waiting)
        self.kv_usage.set(engine.kv_cache_manager.usage)
        kv = engine.kv_cache_manager
        now = (
            engine.num_prompt_tokens,
            engine.num_generation_tokens,
            s.num_preemptions,
            kv.num_queried_tokens,
            kv.num_hit_tokens,
        )
        counters = (
            self.prompt_tokens,
            self.generation_tokens,
            self.preemptions,
            self.cache_queries,
            self.cache_hits,
        )
        _advance(counters, now, self._last)
        self._last = now
        if engine.proposer is not None:
            self._observe_spec(engine.proposer.stats)
        for out in outputs:
            # NOTE: each sample's end is in one output: the server asks for DELTA or FINAL_ONLY outputs
            for c in out.outputs:
                if c.finished:
                    self._success.labels(self.model_name, c.finish_reason or "abort").inc()
            if not out.finished:
                continue
            m = out.metrics
            if m.first_token_time is not None:
                self.ttft.observe(m.first_token_time - m.arrival_time)
            if m.first_scheduled_time is not None:
                self.queue.observe(m.first_scheduled_time - m.arrival_time)
            if m.finished_time is not None:
                self.e2e.observe(m.finished_time - m.arrival_time)
                n = out.outputs[0].num_tokens
                if n > 1 and m.first_token_time is not None:
                    self.tpot.observe((m.finished_time - m.first_token_time) / (n - 1))

    def count_abort(self, reason: str) -> None:
        """AsyncEngine's on_abort hook (engine thread)."""
        self._aborted.labels(self.model_name, reason).inc()

    def _observe_spec(self, st) -> None:
        now = (st.num_drafts, st.num_draft_tokens, st.num_accepted_tokens)
        _advance((self.spec_drafts, self.spec_draft_tokens, self.spec_accepted), now, self._spec_last)
        self._spec_last = now
        for kind, per_pos in (("draft", st.proposed_per_position), ("accepted", st.accepted_per_position)):
            counter = self._spec_per_pos[kind]
            children = [counter.labels(self.model_name, str(j)) for j in range(len(per_pos))]
            _advance(children, per_pos, self._spec_pos_last.get(kind, [0] * len(per_pos)))
            self._spec_pos_last[kind] = list(per_pos)

    def render(self) -> bytes:
        return generate_latest(self.registry)
