"""Tool calling through a real server (the default SmolLM2 with kvloom's chatml_tools template) and the
official openai client: required and named calls always parse and validate, streamed calls assemble,
results of calls go back in the history, and the Hermes parser reads calls under tool_choice auto."""

from __future__ import annotations

import json
from unittest.mock import ANY

import jsonschema
import pytest

from kvloom.server.tools import PARSERS, CallStream, assemble, parse_hermes, required_schema

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


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_streamed_calls_arrive_piece_by_piece_and_equal_the_whole_response(client, choice):
    kw = {"model": MODEL, "messages": ASK, "tools": TOOLS, "tool_choice": choice, "max_tokens": 300}
    whole = client.chat.completions.create(temperature=0, **kw)
    stream = client.chat.completions.create(temperature=0, stream=True, **kw)
    calls: dict[int, dict] = {}
    pieces: dict[int, int] = {}
    finish = None
    for chunk in stream:
        for c in chunk.choices:
            for d in c.delta.tool_calls or []:
                if d.index not in calls:  # a call's first delta names it
                    assert d.id.startswith("call_") and d.type == "function" and d.function.name
                    calls[d.index] = {"name": d.function.name, "arguments": ""}
                else:
                    assert d.id is None and d.function.name is None
                calls[d.index]["arguments"] += d.function.arguments or ""
                pieces[d.index] = pieces.get(d.index, 0) + bool(d.function.arguments)
            finish = c.finish_reason or finish
    assert finish == whole.choices[0].finish_reason == "tool_calls"
    expected = [(t.function.name, t.function.arguments) for t in whole.choices[0].message.tool_calls]
    assert [(calls[i]["name"], calls[i]["arguments"]) for i in sorted(calls)] == expected
    for entry in calls.values():
        jsonschema.validate(json.loads(entry["arguments"]), SCHEMAS[entry["name"]])
    assert all(n > 3 for n in pieces.values()), pieces  # the arguments stream as they are written


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
        ({"tools": TOOLS, "tool_choice": "required", "stop": ["}"]}, "stop"),  # would cut a call short
        (
            {
                "tools": TOOLS,
                "tool_choice": {"type": "function", "function": {"name": "get_time"}},
                "stop_token_ids": [9],
            },
            "stop_token_ids",
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


CALLS = [
    ("get_time", {"timezone": "Europe/Paris"}),
    ("get_weather", {"city": 'Nice "la belle" {x} [y] \\', "unit": "celsius"}),
]


def _assembled(stream, text: str, sizes: list[int], reason: str = "stop"):
    deltas, at, k = [], 0, 0
    while at < len(text):
        n = sizes[k % len(sizes)]
        deltas += stream.feed(text[at : at + n])
        at, k = at + n, k + 1
    rest, finish = stream.finish(reason)
    return (*assemble(deltas + rest), finish, deltas)


@pytest.mark.parametrize("sizes", [[1], [3, 1, 7], [10_000]], ids=["chars", "pieces", "whole"])
def test_call_stream_reads_required_arrays_as_they_are_written(sizes):
    text = json.dumps([{"name": n, "arguments": a} for n, a in CALLS])
    content, calls, finish, deltas = _assembled(CallStream("required", None, set(SCHEMAS)), text, sizes)
    assert finish == "tool_calls" and not content
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == CALLS
    assert calls[0]["function"]["arguments"] == json.dumps(CALLS[0][1])  # as written, not re-serialized
    if sizes == [1]:  # a call is announced before its arguments are written, not once it closes
        first_args = next(i for i, d in enumerate(deltas) if d["tool_calls"][0]["function"].get("arguments"))
        assert "id" in deltas[0]["tool_calls"][0] and first_args > 0


def test_call_stream_sends_hermes_calls_as_each_closes_and_text_before_them():
    block = '<tool_call>{"name": "get_time", "arguments": {"timezone": "Europe/Paris"}}</tool_call>'
    stream = CallStream("auto", PARSERS["hermes"], set(SCHEMAS))
    assert stream.feed("Let me check. <tool") == [{"content": "Let me check. "}]  # "<tool" is held
    assert stream.feed(block[5:]) == [
        {
            "tool_calls": [
                {
                    "index": 0,
                    "id": ANY,
                    "type": "function",
                    "function": {"name": "get_time", "arguments": ANY},
                }
            ]
        }
    ]
    assert stream.feed("\n<tool_call>{broken") == []
    assert stream.finish("stop") == ([], "tool_calls")
    # no calls at all: what was held back is text
    stream = CallStream("auto", PARSERS["hermes"], set(SCHEMAS))
    content, calls, finish, _ = _assembled(stream, "a <tool_call>not json</tool_call> b", [4])
    assert (content, calls, finish) == ("a <tool_call>not json</tool_call> b", [], "stop")


def test_call_stream_streams_a_named_functions_arguments():
    content, calls, finish, deltas = _assembled(
        CallStream("named", None, set(SCHEMAS), "get_time"), '{"timezone": "Europe/Paris"}', [5]
    )
    assert finish == "tool_calls" and content is None and len(deltas) == 6
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in calls] == [
        ("get_time", '{"timezone": "Europe/Paris"}')
    ]
    _, _, finish, _ = _assembled(
        CallStream("named", None, set(SCHEMAS), "get_time"), '{"timez', [5], "length"
    )
    assert finish == "length"


@pytest.mark.parametrize(
    ("template", "parser", "end"),
    [
        ("chatml_tools", "hermes", "<|im_end|>"),
        ("llama3_json_tools", "llama3_json", "<|eom_id|>"),
        ("mistral_tools", "mistral", "</s>"),
    ],
)
def test_shipped_templates_render_calls_that_their_parser_reads_back(template, parser, end):
    from transformers.utils.chat_template_utils import render_jinja_template

    from kvloom.server.tools import pick_parser, read_template

    text = read_template(template)
    assert pick_parser(text) == parser
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_time", "arguments": '{"timezone": "Asia/Tokyo"}'},
    }
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Time in Tokyo?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"time": "10:00"}'},
        {"role": "user", "content": "And now?"},
    ]
    rendered = render_jinja_template(
        [conversation],
        tools=TOOLS,
        chat_template=text,
        add_generation_prompt=True,
        bos_token="<s>",
        eos_token="</s>",
    )[0][0]
    for needle in ("Be brief.", "Time in Tokyo?", "10:00", "And now?", "get_weather", '"maxLength": 30'):
        assert needle in rendered
    # the assistant's turn as rendered reads back as the call it was
    start = rendered.index("Time in Tokyo?") + len("Time in Tokyo?")
    turn = rendered[start : rendered.index(end, rendered.index("Asia/Tokyo", start))]  # to its end token
    _, calls = PARSERS[parser].parse(turn, set(SCHEMAS))
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_time", {"timezone": "Asia/Tokyo"})]
