"""The OpenAI-compatible server against the official openai client, on a real server on loopback."""

from __future__ import annotations

import asyncio
import json
import re
import time

import httpx
import openai
import pytest

from kvloom import SamplingParams

from .conftest import API_KEY, Server

MODEL = "stories-chat"
HEADERS = {"Authorization": f"Bearer {API_KEY}"}


def metric(server, name: str) -> float:
    text = httpx.get(f"{server.url}/metrics").text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def wait_for(predicate, timeout: float = 10.0) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def test_models_health_version_tokenize(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert "version" in httpx.get(f"{server.url}/version").json()
    tok = httpx.post(f"{server.url}/tokenize", json={"prompt": "Once upon a time"}).json()
    assert tok["count"] == len(tok["tokens"]) and tok["tokens"][0] == 1
    text = httpx.post(f"{server.url}/detokenize", json={"tokens": tok["tokens"][1:]}).json()["prompt"]
    assert text == "Once upon a time"
    chat = httpx.post(f"{server.url}/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).json()
    assert chat["tokens"].count(1) == 1  # one BOS, from the template
    # add_special_tokens is honored with messages too (the tokenizer's BOS before the template's)
    body = {"messages": [{"role": "user", "content": "hi"}], "add_special_tokens": True}
    doubled = httpx.post(f"{server.url}/tokenize", json=body).json()
    assert doubled["tokens"] == [1, *chat["tokens"]]
    plain = httpx.post(f"{server.url}/tokenize", json={"prompt": "Once", "add_special_tokens": False}).json()
    assert plain["tokens"][0] != 1


def test_completion_greedy_equals_offline_and_reports_usage(client, chat_llm):
    r = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=30, temperature=0)
    offline = chat_llm.generate(["Once upon a time"], SamplingParams(temperature=0, max_tokens=30))[0]
    assert r.choices[0].text == offline.outputs[0].text
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(offline.prompt_token_ids) and r.usage.completion_tokens == 30
    assert r.usage.total_tokens == r.usage.prompt_tokens + 30
    # A list of prompts, and a prompt of token ids.
    r = client.completions.create(model=MODEL, prompt=["Lily", "Tom"], max_tokens=5, temperature=0)
    assert [c.index for c in r.choices] == [0, 1]
    ids = chat_llm.get_tokenizer()("Lily").input_ids
    r2 = client.completions.create(model=MODEL, prompt=ids, max_tokens=5, temperature=0)
    assert r2.choices[0].text == r.choices[0].text


def test_chat_with_system_user_assistant_turns(client, chat_llm):
    messages = [
        {"role": "system", "content": "You tell stories."},
        {"role": "user", "content": "Tell me about Lily."},
        {"role": "assistant", "content": "Lily is a girl."},
        {"role": "user", "content": "And then?"},
    ]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0)
    ids = chat_llm.apply_chat_template(messages)
    offline = chat_llm.generate([ids], SamplingParams(temperature=0, max_tokens=12))[0].outputs[0]
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == offline.text
    assert r.usage.prompt_tokens == len(ids)
    r = client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=3, temperature=0)
    assert r.usage.completion_tokens == 3


@pytest.mark.parametrize("kind", ["completions", "chat"])
def test_streamed_text_equals_non_streamed_for_a_seeded_request(client, kind):
    kw = dict(model=MODEL, max_tokens=40, temperature=1.0, seed=7)
    if kind == "completions":
        full = client.completions.create(prompt="Once upon a time", **kw).choices[0].text
        chunks = list(client.completions.create(prompt="Once upon a time", stream=True, **kw))
        streamed = "".join(c.choices[0].text for c in chunks)
        assert chunks[-1].choices[0].finish_reason == "length"
        assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    else:
        messages = [{"role": "user", "content": "Tell me a story"}]
        full = client.chat.completions.create(messages=messages, **kw).choices[0].message.content
        chunks = list(client.chat.completions.create(messages=messages, stream=True, **kw))
        assert chunks[0].choices[0].delta.role == "assistant"
        assert chunks[-1].choices[0].finish_reason == "length"
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert streamed == full and len(full) > 20


def test_stream_usage_and_done_marker(server):
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 5,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, headers=HEADERS) as r:
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line[6:]) for line in lines[:-1]]
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 5
    assert all(e["usage"] is None for e in events[:-1])


def test_n_stop_logprobs_echo(client, chat_llm):
    r = client.completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=20, temperature=1.0, n=2, seed=3
    )
    assert sorted(c.index for c in r.choices) == [0, 1] and r.choices[0].text != r.choices[1].text
    full = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=30, temperature=0)
    text = full.choices[0].text
    r = client.completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=30, temperature=0, stop=["Lily"]
    )
    assert r.choices[0].text == text[: text.index("Lily")] and r.choices[0].finish_reason == "stop"
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model=MODEL, prompt="Once upon a time", max_tokens=30, temperature=0, stop=["Lily"], stream=True
        )
    )
    assert streamed == r.choices[0].text

    r = client.completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=5, temperature=0, logprobs=3, echo=True
    )
    c = r.choices[0]
    assert c.text.startswith("Once upon a time")
    prompt_len = r.usage.prompt_tokens
    assert len(c.logprobs.tokens) == prompt_len + 5
    assert c.logprobs.token_logprobs[0] is None and all(x <= 0 for x in c.logprobs.token_logprobs[1:])
    assert all(len(t) == 3 for t in c.logprobs.top_logprobs[1:])

    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=4,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    content = r.choices[0].logprobs.content
    assert len(content) == 4 and all(len(x.top_logprobs) == 2 for x in content)
    assert all(x.logprob == x.top_logprobs[0].logprob for x in content)  # greedy picks the top one
    ref = chat_llm.generate(
        [chat_llm.apply_chat_template([{"role": "user", "content": "hi"}])],
        SamplingParams(temperature=0, max_tokens=4, logprobs=2),
    )[0].outputs[0]
    assert [x.logprob for x in content] == pytest.approx(
        [e[t].logprob for t, e in zip(ref.token_ids, ref.logprobs, strict=True)], abs=1e-4
    )


def test_64_concurrent_streaming_clients_match_offline(aclient, chat_llm):
    words = ["Lily", "Tom", "The dog", "A cat", "Once", "The sun", "Ben", "Sue"]
    prompts = [f"{words[i % 8]} {'and ' * (i % 5)}{words[(i * 3) % 8]}" for i in range(64)]
    params = SamplingParams(temperature=0, max_tokens=24)
    expected = [o.outputs[0].text for o in chat_llm.generate(prompts, params)]

    async def one(p: str) -> str:
        stream = await aclient.completions.create(
            model=MODEL, prompt=p, max_tokens=24, temperature=0, stream=True
        )
        return "".join([c.choices[0].text async for c in stream])

    async def main() -> list[str]:
        return await asyncio.gather(*(one(p) for p in prompts))

    assert asyncio.run(main()) == expected


ERRORS = [
    ({"prompt": "x", "temperature": -1}, 400, "temperature"),
    ({"prompt": "x", "top_p": 1.5}, 400, "top_p"),
    ({"prompt": "x", "top_k": 0}, 400, "top_k"),
    ({"prompt": "x", "n": 0}, 400, "n"),
    ({"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ({"prompt": "x", "logprobs": 50}, 400, "logprobs"),
    ({"prompt": "x", "presence_penalty": 5}, 400, "presence_penalty"),
    ({"prompt": "x", "logit_bias": {"99999": 1}}, 400, "logit_bias"),
    ({"prompt": ""}, 400, "prompt"),
    ({"prompt": [99999]}, 400, "prompt"),
    ({"temperature": 0.5}, 400, "prompt"),
    ({"prompt": "x", "max_tokens": "many"}, 400, "max_tokens"),
    ({"prompt": "x", "model": "gpt-4"}, 404, "model"),
]


@pytest.mark.parametrize("body, status, param", ERRORS)
def test_errors_have_openai_bodies_and_the_server_goes_on(server, client, body, status, param):
    r = httpx.post(f"{server.url}/v1/completions", json={"model": MODEL, **body}, headers=HEADERS)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"] and err["type"]
    assert client.completions.create(model=MODEL, prompt="Lily", max_tokens=2).usage.completion_tokens == 2


def test_context_length_error_names_both_numbers(server):
    r = httpx.post(
        f"{server.url}/v1/completions",
        json={"model": MODEL, "prompt": "Once", "max_tokens": 600},
        headers=HEADERS,
    )
    assert r.status_code == 400
    msg = r.json()["error"]["message"]
    assert "512" in msg and re.search(r"60[0-9] tokens", msg) and "600" in msg


def test_auth_body_limit_bad_json_unknown_route(server, client):
    from openai import OpenAI

    bad = OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model=MODEL, prompt="x", max_tokens=1)
    r = httpx.post(f"{server.url}/v1/completions", json={"model": MODEL, "prompt": "x"})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    r = httpx.post(
        f"{server.url}/v1/completions", json={"model": MODEL, "prompt": "x" * (2 << 20)}, headers=HEADERS
    )
    assert r.status_code == 413 and "error" in r.json()
    r = httpx.post(
        f"{server.url}/v1/completions",
        content=b"{not json",
        headers={**HEADERS, "content-type": "application/json"},
    )
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = httpx.get(f"{server.url}/v1/nothing-here", headers=HEADERS)
    assert r.status_code == 404 and "error" in r.json()
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="other", messages=[{"role": "user", "content": "x"}])
    assert client.completions.create(model=MODEL, prompt="Lily", max_tokens=2).usage.completion_tokens == 2


def test_metrics_move(server, client):
    names = [
        "kvloom:time_to_first_token_seconds_count",
        "kvloom:time_per_output_token_seconds_count",
        "kvloom:e2e_request_latency_seconds_count",
        "kvloom:request_queue_time_seconds_count",
        "kvloom:prompt_tokens_total",
        "kvloom:generation_tokens_total",
        "kvloom:request_success_total",
    ]
    before = {n: metric(server, n) for n in names}
    for _ in range(3):
        client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=8, temperature=0)
    after = {n: metric(server, n) for n in names}
    assert all(after[n] > before[n] for n in names), (before, after)
    assert after["kvloom:generation_tokens_total"] - before["kvloom:generation_tokens_total"] == 24
    text = httpx.get(f"{server.url}/metrics").text
    for gauge in (
        "kvloom:num_requests_waiting",
        "kvloom:kv_cache_usage_perc",
        "kvloom:num_preemptions_total",
    ):
        assert gauge in text


def test_sigterm_finishes_in_flight_requests_and_exits_0(chat_model):
    s = Server(chat_model)
    body = {
        "model": MODEL,
        "prompt": "Once upon a time",
        "max_tokens": 200,
        "ignore_eos": True,
        "stream": True,
    }
    with httpx.stream("POST", f"{s.url}/v1/completions", json=body, timeout=60) as r:
        lines = iter(r.iter_lines())
        next(lines)
        s.proc.send_signal(15)
        rest = [line for line in lines if line]
    assert rest[-1] == "data: [DONE]"
    assert json.loads(rest[-2][6:])["choices"][0]["finish_reason"] == "length"
    assert s.proc.wait(timeout=60) == 0
    s.log.close()


def test_list_of_prompts_streams_each_choice_and_a_bad_one_aborts_the_rest(server, client):
    kw = dict(model=MODEL, prompt=["Lily", "Tom went"], max_tokens=12, temperature=0)
    full = client.completions.create(**kw)
    texts = {0: "", 1: ""}
    finished = set()
    for chunk in client.completions.create(stream=True, **kw):
        for c in chunk.choices:
            texts[c.index] += c.text
            if c.finish_reason:
                finished.add(c.index)
    assert finished == {0, 1}
    assert [texts[c.index] for c in sorted(full.choices, key=lambda c: c.index)] == [
        c.text for c in sorted(full.choices, key=lambda c: c.index)
    ]
    r = httpx.post(
        f"{server.url}/v1/completions",
        headers=HEADERS,
        json={"model": MODEL, "prompt": [[1, 300, 301], [1, 99999]], "max_tokens": 400, "ignore_eos": True},
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    assert wait_for(lambda: metric(server, "kvloom:num_requests_running") == 0)
    assert metric(server, "kvloom:kv_cache_usage_perc") == 0


def test_cached_tokens_in_usage_and_cache_metrics(server, client):
    # Words no earlier test produced (their greedy outputs are cached too, which is the point of caching).
    prompt = "Zebra violin quartz marmalade " * 12
    before = (
        metric(server, "kvloom:prefix_cache_queries_total"),
        metric(server, "kvloom:prefix_cache_hits_total"),
    )
    first = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0)
    second = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert second.usage.prompt_tokens_details.cached_tokens == (second.usage.prompt_tokens - 1) // 16 * 16 > 0
    assert second.choices[0].text == first.choices[0].text
    other = client.completions.create(
        model=MODEL,
        prompt=prompt,
        max_tokens=4,
        temperature=0,
        extra_body={"cache_salt": "tenant-b", "priority": 3},
    )
    assert other.usage.prompt_tokens_details.cached_tokens == 0
    after = (
        metric(server, "kvloom:prefix_cache_queries_total"),
        metric(server, "kvloom:prefix_cache_hits_total"),
    )
    assert after[0] - before[0] == 3 * second.usage.prompt_tokens
    assert after[1] - before[1] == second.usage.prompt_tokens_details.cached_tokens
    messages = [{"role": "user", "content": prompt}]
    client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2)
    chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2)
    assert chat.usage.prompt_tokens_details.cached_tokens > 0


def test_start_up_objects_are_frozen_out_of_the_collector_while_serving(stories):
    """While the app runs, what start-up made is frozen (gc.freeze): in a serving run a full collection
    walked it for 210-290 ms, a stall of every request in flight. Shutdown unfreezes it."""
    import gc

    from fastapi.testclient import TestClient

    from kvloom import LLMEngine
    from kvloom.async_engine import AsyncEngine
    from kvloom.server.api import build_app

    gc.unfreeze()
    engine = AsyncEngine(LLMEngine.from_args(str(stories), show_progress=False))
    app = build_app(engine, "stories")
    with TestClient(app) as client:
        assert gc.get_freeze_count() > 50_000
        body = {"model": "stories", "prompt": "Once upon", "max_tokens": 4}
        assert client.post("/v1/completions", json=body).status_code == 200
    assert gc.get_freeze_count() == 0
