"""`kvloom serve` with no --model: the default SmolLM2 GGUF, its chat template, and client disconnects."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from .conftest import Server
from .test_openai_api import metric, wait_for

MODEL = "SmolLM2-135M-Instruct.Q4_1"


@pytest.fixture(scope="module")
def smol_server(tmp_path_factory):
    s = Server(
        None, "--max-model-len", "1024", "--kv-cache-memory", "0.25", log_dir=tmp_path_factory.mktemp("smol")
    )
    yield s
    assert s.stop() == 0


@pytest.mark.slow
def test_default_model_chat(smol_server):
    from openai import OpenAI

    client = OpenAI(base_url=f"{smol_server.url}/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list().data] == [MODEL]
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=20,
        temperature=0,
    )
    assert "Paris" in r.choices[0].message.content and r.choices[0].finish_reason == "stop"
    # No --allowed-origins: no CORS headers for a browser's origin.
    r = httpx.post(
        f"{smol_server.url}/tokenize", json={"prompt": "hi"}, headers={"Origin": "http://a.example"}
    )
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


@pytest.mark.slow
def test_disconnect_mid_stream_frees_blocks(smol_server):
    server = smol_server
    assert wait_for(lambda: metric(server, "kvloom:num_requests_running") == 0)
    body = {
        "model": MODEL,
        "prompt": "Once upon a time",
        "max_tokens": 900,
        "ignore_eos": True,
        "stream": True,
    }
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body) as r:
        lines = r.iter_lines()
        for _ in range(7):
            next(lines)
        # Still connected and reading: the request runs and holds blocks.
        assert metric(server, "kvloom:num_requests_running") == 1
        assert metric(server, "kvloom:kv_cache_usage_perc") > 0
        # NOTE: closing the iterator closes the connection (httpcore), which is the disconnect.
        lines.close()
    # The client is gone: the request is aborted and its blocks are freed long before 900 tokens.
    assert wait_for(lambda: metric(server, "kvloom:kv_cache_usage_perc") == 0, timeout=5)
    assert metric(server, "kvloom:num_requests_running") == 0
    assert metric(server, "kvloom:generation_tokens_total") < 600


def _idle(server) -> bool:
    return all(
        metric(server, name) == 0
        for name in (
            "kvloom:num_requests_running",
            "kvloom:num_requests_waiting",
            "kvloom:kv_cache_usage_perc",
        )
    )


def _aborted(server, reason: str) -> float:
    return metric(server, f'kvloom:request_aborted_total{{model_name="{MODEL}",reason="{reason}"}}')


LONG_CMPL = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 900, "ignore_eos": True}
LONG_CHAT = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "Tell me a long story."}],
    "max_tokens": 900,
    "ignore_eos": True,
}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("path", "payload", "stream"),
    [
        ("/v1/completions", {**LONG_CMPL, "n": 1}, False),
        ("/v1/completions", {**LONG_CMPL, "n": 3, "temperature": 1.0}, False),
        ("/v1/chat/completions", {**LONG_CHAT, "n": 1}, False),
        ("/v1/chat/completions", {**LONG_CHAT, "n": 2, "temperature": 1.0}, False),
        ("/v1/completions", {**LONG_CMPL, "n": 3, "temperature": 1.0}, True),
        ("/v1/chat/completions", {**LONG_CHAT, "n": 2, "temperature": 1.0}, True),
    ],
    ids=["cmpl-n1", "cmpl-n3", "chat-n1", "chat-n2", "cmpl-n3-stream", "chat-n2-stream"],
)
def test_dropped_request_frees_its_blocks_within_2s(smol_server, path, payload, stream):
    """A client that goes away, streaming or not, one sample or several: its request is aborted, KV blocks
    and the running/waiting gauges are back to zero within 2 s, and the abort is counted."""
    server = smol_server
    assert wait_for(lambda: _idle(server))
    gone = _aborted(server, "client_gone")
    url = f"{server.url}{path}"
    if stream:
        with httpx.stream("POST", url, json={**payload, "stream": True}, timeout=30) as r:
            lines = r.iter_lines()
            for _ in range(5):
                next(lines)
            # (the samples after the first are forked once its prompt is computed: give them a step)
            assert wait_for(lambda: metric(server, "kvloom:num_requests_running") == payload["n"], timeout=5)
            lines.close()  # closes the connection: the disconnect
    else:
        result: list = []

        def post() -> None:
            try:
                result.append(httpx.post(url, json=payload, timeout=httpx.Timeout(5, read=2.5)))
            except httpx.ReadTimeout as e:  # the client gives up and closes its connection
                result.append(e)

        t = threading.Thread(target=post)
        t.start()
        assert wait_for(lambda: metric(server, "kvloom:num_requests_running") == payload["n"], timeout=5)
        assert metric(server, "kvloom:kv_cache_usage_perc") > 0
        t.join()
        assert isinstance(result[0], httpx.ReadTimeout)
    t0 = time.monotonic()
    assert wait_for(lambda: _idle(server), timeout=2), "blocks not freed within 2 s"
    assert time.monotonic() - t0 < 2
    assert wait_for(lambda: _aborted(server, "client_gone") == gone + 1, timeout=1)


@pytest.mark.slow
def test_health_answers_while_a_4mib_prompt_is_tokenized_and_rejected(smol_server):
    """Tokenization runs off the event loop (/tokenize takes seconds on 4 MiB): /health keeps answering.
    A prompt or chat whose bytes cannot fit in the context is refused before it is tokenized."""
    server = smol_server
    text = "the quick brown fox jumps over the lazy dog " * (4 * 2**20 // 44)
    cases = [
        ("/tokenize", {"prompt": text}, 200, None),
        ("/v1/completions", {"prompt": text}, 400, "prompt"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": text}]}, 400, "messages"),
        ("/v1/completions", {"prompt": text[: 300 * 1024]}, 400, "prompt"),  # tokenized, then too long
    ]
    for path, payload, status, field in cases:
        result: list = []

        def post(url: str, body: dict, out: list) -> None:
            out.append(httpx.post(url, json=body, timeout=120))

        t = threading.Thread(target=post, args=(f"{server.url}{path}", payload, result))
        t.start()
        gaps = []
        while t.is_alive():
            t0 = time.monotonic()
            assert httpx.get(f"{server.url}/health", timeout=5).status_code == 200
            gaps.append(time.monotonic() - t0)
            time.sleep(0.02)
        t.join()
        # NOTE: 0.5 s, not less: on a 2-core host busy tokenizing, /health once took 0.23 s; blocking on the
        # tokenization would take seconds
        assert not gaps or max(gaps) < 0.5, f"{path}: /health took {max(gaps):.3f} s"
        r = result[0]
        assert r.status_code == status, r.text
        if status == 200:
            assert len(gaps) > 5, "tokenizing ended before /health was probed a few times"
            assert r.json()["count"] > 500_000
        else:
            assert r.json()["error"]["param"] == field


@pytest.mark.slow
def test_sigterm_past_the_timeout_ends_every_client_well(tmp_path):
    """Requests still running when --shutdown-timeout passes: a stream gets an SSE error event and
    [DONE], a non-streaming request a JSON 503; the server exits 0 with no traceback in its log."""
    server = Server(
        None,
        "--max-model-len",
        "1024",
        "--kv-cache-memory",
        "0.25",
        "--shutdown-timeout",
        "1",
        log_dir=tmp_path,
    )
    events: list[str] = []
    answers: list[httpx.Response] = []

    def stream() -> None:
        with httpx.stream(
            "POST", f"{server.url}/v1/completions", json={**LONG_CMPL, "stream": True}, timeout=60
        ) as r:
            events.extend(e for e in r.iter_lines() if e)

    def plain() -> None:
        answers.append(httpx.post(f"{server.url}/v1/chat/completions", json=LONG_CHAT, timeout=60))

    threads = [threading.Thread(target=stream), threading.Thread(target=plain)]
    for t in threads:
        t.start()
    assert wait_for(lambda: metric(server, "kvloom:num_requests_running") == 2, timeout=10)
    assert server.stop() == 0
    for t in threads:
        t.join(timeout=30)
    assert events[-1] == "data: [DONE]"
    error = json.loads(events[-2].removeprefix("data: "))["error"]
    assert error["type"] == "service_unavailable" and "shutting down" in error["message"]
    assert json.loads(events[0].removeprefix("data: "))["choices"][0]["text"] is not None
    assert answers[0].status_code == 503
    assert answers[0].json()["error"]["type"] == "service_unavailable"
    log = server.output_after_stop()
    assert "Traceback" not in log and "CancelledError" not in log, log
    assert "Shutdown timeout (1.0s) reached" in log
