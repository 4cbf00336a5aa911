"""`kvloom serve` with no --model: the default SmolLM2 GGUF, its chat template, and client disconnects."""

from __future__ import annotations

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
