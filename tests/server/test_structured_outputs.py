"""Structured outputs through a real server (the default SmolLM2 model) with the official openai client:
every output follows its format at temperature > 0; bad formats are 400s naming the field."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from .conftest import Server

MODEL = "SmolLM2-135M-Instruct.Q4_1"

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
        "email": {"type": "string", "pattern": "^[a-z]{1,10}@[a-z]{1,10}\\.com$"},
        "address": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 20},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
            },
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 10}, "minItems": 1, "maxItems": 3},
        "score": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 10}, {"type": "null"}]},
    },
    "required": ["name", "age", "role", "email", "address", "tags", "score"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(
        None, "--max-model-len", "1024", "--kv-cache-memory", "0.25", log_dir=tmp_path_factory.mktemp("so")
    )
    yield s
    assert s.stop() == 0


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def _chat(client, content: str, **kw):
    return client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": content}], max_tokens=300, **kw
    )


def test_json_schema_outputs_validate(client):
    r = _chat(
        client,
        "Make up a user record.",
        temperature=0.9,
        seed=11,
        n=4,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "person", "schema": PERSON, "strict": True},
        },
    )
    for choice in r.choices:
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content), PERSON)


def test_json_object_is_an_object(client):
    r = client.chat.completions.create(
        model=MODEL,
        messages=[
            {
                "role": "user",
                "content": 'Reply with JSON like {"city": "Rome", "country": "Italy"} for Paris.',
            }
        ],
        max_tokens=600,
        temperature=0.8,
        seed=3,
        n=2,
        response_format={"type": "json_object"},
    )
    for choice in r.choices:
        assert choice.finish_reason == "stop", choice.message.content
        assert isinstance(json.loads(choice.message.content), dict)


def test_regex_and_choice_on_completions_and_chat(client):
    r = client.completions.create(
        model=MODEL,
        prompt="A serial number:",
        max_tokens=20,
        temperature=1.0,
        n=3,
        extra_body={"structured_outputs": {"regex": "[A-Z]{2}-[0-9]{3}"}},
    )
    for choice in r.choices:
        assert re.fullmatch("[A-Z]{2}-[0-9]{3}", choice.text), choice.text
    r = _chat(
        client,
        "Is the sky blue?",
        temperature=1.0,
        n=3,
        extra_body={"structured_outputs": {"choice": ["yes", "no", "it depends"]}},
    )
    assert all(c.message.content in ("yes", "no", "it depends") for c in r.choices)


def test_streamed_json_schema(client):
    stream = _chat(
        client,
        "Make up a user record.",
        temperature=0.7,
        stream=True,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}},
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    jsonschema.validate(json.loads(text), PERSON)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "nope"}},
                }
            },
            "response_format",
        ),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
        ({"response_format": {"type": "xml"}}, "response_format"),
        ({"structured_outputs": {"regex": "("}}, "structured_outputs"),
        ({"structured_outputs": {"grammar": 'root ::= ("a"'}}, "structured_outputs"),
        ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
        ({"structured_outputs": {"choice": []}}, "structured_outputs"),
        (
            {"structured_outputs": {"regex": "a"}, "response_format": {"type": "json_object"}},
            "response_format",
        ),
        ({"structured_outputs": {"json": "{not json"}}, "structured_outputs"),
    ],
)
def test_bad_formats_are_400s_naming_the_field(server, body, field):
    import httpx

    r = httpx.post(
        f"{server.url}/v1/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, **body},
        timeout=60,
    )
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"].startswith(field), r.json()
