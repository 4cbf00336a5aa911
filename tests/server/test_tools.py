"""Tool calling through a real server (the default SmolLM2 with kvloom's chatml_tools template) and the
official openai client: required and named calls always parse and validate, streamed calls assemble,
results of calls go back in the history, and the Hermes parser reads calls under tool_choice auto."""

from __future__ import annotations

import json

import jsonschema
import pytest

from kvloom.server.tools import parse_hermes, required_schema

from .conftest import Server

MODEL = "SmolLM2-135M-Instruct.Q4_1"
WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 30},
        "unit": {"enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TIME = {
    "type": "object",
    "properties": {"timezone": {"type": "string", "pattern": "^[A-Z][a-z]+/[A-Z][a-z]+$"}},
    "required": ["timezone"],
    "additionalProperties": False,
}
TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "Weather now", "parameters": WEATHER},
    },
    {"type": "function", "function": {"name": "get_time", "description": "Local time", "parameters": TIME}},
]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
ASK = [{"role": "user", "content": "What is the weather in Paris, and the time in Europe/Paris?"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(
        None,
        "--max-model-len",
        "2048",
        "--kv-cache-memory",
        "0.25",
        "--chat-template",
        "chatml_tools",
        log_dir=tmp_path_factory.mktemp("tools"),
    )
    yield s
    assert s.stop() == 0


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def _valid(calls) -> None:
    assert calls
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


@pytest.mark.parametrize("parallel", [True, False])
def test_required_calls_parse_and_validate(client, parallel):
    r = client.chat.completions.create(
        model=MODEL,
        messages=ASK,
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=parallel,
        temperature=0.9,
        seed=5,
        n=3,
        max_tokens=300,
    )
    for choice in r.choices:
        assert choice.finish_reason == "tool_calls"
        _valid(choice.message.tool_calls)
        if not parallel:
            assert len(choice.message.tool_calls) == 1


def test_named_function(client):
    r = client.chat.completions.create(
        model=MODEL,
        messages=ASK,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_time"}},
        temperature=0.9,
        seed=2,
        max_tokens=200,
    )
    (call,) = r.choices[0].message.tool_calls
    assert call.function.name == "get_time" and r.choices[0].finish_reason == "tool_calls"
    _valid([call])


def test_streamed_calls_assemble(client):
    stream = client.chat.completions.create(
        model=MODEL,
        messages=ASK,
        tools=TOOLS,
        tool_choice="required",
        temperature=0.5,
        max_tokens=300,
        stream=True,
    )
    calls: dict[int, dict] = {}
    finish = None
    for chunk in stream:
        for choice in chunk.choices:
            for d in choice.delta.tool_calls or []:
                entry = calls.setdefault(d.index, {"name": "", "arguments": ""})
                entry["name"] += d.function.name or ""
                entry["arguments"] += d.function.arguments or ""
            finish = choice.finish_reason or finish
    assert finish == "tool_calls" and calls
    for entry in calls.values():
        jsonschema.validate(json.loads(entry["arguments"]), SCHEMAS[entry["name"]])


def test_a_conversation_with_tool_results(client):
    first = client.chat.completions.create(
        model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required", temperature=0, max_tokens=300
    )
    message = first.choices[0].message
    history = [*ASK, message.model_dump(exclude_none=True)]
    for call in message.tool_calls:
        history.append(
            {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"result": "sunny, 21 C"})}
        )
    r = client.chat.completions.create(
        model=MODEL, messages=history, tools=TOOLS, tool_choice="none", max_tokens=40
    )
    assert r.choices[0].message.content and r.choices[0].message.tool_calls is None


def test_auto_answers_with_text_or_valid_calls(client):
    r = client.chat.completions.create(
        model=MODEL, messages=ASK, tools=TOOLS, temperature=0.7, seed=1, max_tokens=200
    )
    message = r.choices[0].message
    if message.tool_calls:
        assert r.choices[0].finish_reason == "tool_calls"
        for call in message.tool_calls:
            assert call.function.name in SCHEMAS
            json.loads(call.function.arguments)
    else:
        assert message.content


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"tool_choice": "required"}, "tool_choice"),  # no tools
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tools": [TOOLS[0], TOOLS[0]]}, "tools"),
        ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools"),
        (
            {"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
            "tool_choice",
        ),
        (
            {
                "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": 7}}}],
                "tool_choice": "required",
            },
            "tools",
        ),
    ],
)
def test_bad_tool_requests_are_400s(server, body, field):
    import httpx

    r = httpx.post(
        f"{server.url}/v1/chat/completions",
        json={"model": MODEL, "messages": ASK, "max_tokens": 5, **body},
        timeout=60,
    )
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"].startswith(field), r.json()


def test_hermes_parser():
    call = '{"name": "get_time", "arguments": {"timezone": "Europe/Paris"}}'
    text = f"Let me check.\n<tool_call>\n{call}\n</tool_call>"
    content, calls = parse_hermes(text + "\n<tool_call>{not json}</tool_call>", {"get_time"})
    assert content == "Let me check."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_time", {"timezone": "Europe/Paris"})]
    assert parse_hermes("no calls here", {"get_time"}) == ("no calls here", [])
    assert parse_hermes('<tool_call>{"name": "other", "arguments": {}}</tool_call>', {"get_time"})[1] == []


def test_required_schema_is_one_call_without_parallel():
    schema = required_schema([{"name": "f", "parameters": {"type": "object"}}], parallel=False)
    jsonschema.validate([{"name": "f", "arguments": {}}], schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([{"name": "f", "arguments": {}}] * 2, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([{"name": "g", "arguments": {}}], schema)


def test_an_agent_library_runs_a_tool_conversation(server):
    """openai-agents drives the server: a required call, the tool's result back in the history, then
    the model's answer (the library resets tool_choice to auto after a call)."""
    from agents import (
        Agent,
        ModelSettings,
        OpenAIChatCompletionsModel,
        Runner,
        function_tool,
        set_tracing_disabled,
    )
    from openai import AsyncOpenAI

    set_tracing_disabled(True)
    cities = []

    @function_tool
    def get_weather(city: str) -> str:
        """The weather now in a city."""
        cities.append(city)
        return f"It is sunny and 21 C in {city}."

    client = AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    agent = Agent(
        name="weather",
        instructions="Answer weather questions with the get_weather tool.",
        tools=[get_weather],
        model=OpenAIChatCompletionsModel(model=MODEL, openai_client=client),
        model_settings=ModelSettings(tool_choice="required", temperature=0, max_tokens=100),
    )
    result = Runner.run_sync(agent, "What is the weather in Paris?", max_turns=4)
    kinds = [type(item).__name__ for item in result.new_items]
    assert kinds[:2] == ["ToolCallItem", "ToolCallOutputItem"] and kinds[-1] == "MessageOutputItem"
    assert len(cities) == 1 and cities[0]
    assert isinstance(result.final_output, str) and result.final_output


def test_llama3_and_mistral_parsers():
    from kvloom.server.tools import PARSERS, parse_llama3_json, parse_mistral, pick_parser

    names = {"get_time", "get_weather"}
    one = '{"name": "get_time", "parameters": {"timezone": "Europe/Paris"}}'
    two = '{"name": "get_weather", "parameters": {"city": "Rome", "unit": "celsius"}}'
    content, calls = parse_llama3_json(f"<|python_tag|>{one}; {two}", names)
    assert content is None and [c.name for c in calls] == ["get_time", "get_weather"]
    assert json.loads(calls[1].arguments) == {"city": "Rome", "unit": "celsius"}
    assert parse_llama3_json(one, names)[1][0].name == "get_time"
    assert parse_llama3_json('{"answer": 42}', names) == ('{"answer": 42}', [])
    assert parse_llama3_json("Paris is sunny.", names) == ("Paris is sunny.", [])
    array = '[{"name": "get_time", "arguments": {"timezone": "Asia/Tokyo"}}]'
    content, calls = parse_mistral(f"Sure. [TOOL_CALLS] {array}", names)
    assert content == "Sure." and json.loads(calls[0].arguments) == {"timezone": "Asia/Tokyo"}
    calls = parse_mistral(
        '[TOOL_CALLS]get_time[ARGS]{"timezone": "Asia/Tokyo"}[TOOL_CALLS]nope[ARGS]{}', names
    )[1]
    assert [c.name for c in calls] == ["get_time"]
    assert parse_mistral("no calls", names) == ("no calls", [])
    # streaming holds back from a call's start (or a marker begun at the end of the text)
    assert PARSERS["hermes"].shown("Let me see <tool_") == len("Let me see ")
    assert PARSERS["mistral"].shown("Ok [TOOL_CALLS] [") == len("Ok ")
    assert PARSERS["llama3_json"].shown('{"name": "get') == 0
    assert PARSERS["llama3_json"].shown("Plain text") == len("Plain text")
    assert pick_parser("... [TOOL_CALLS] ...") == "mistral" and pick_parser("<|python_tag|>") == "llama3_json"
    assert pick_parser("{{ messages }}") is None
