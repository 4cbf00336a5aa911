"""Bad input, as a careless client or an attacker sends it, over every parameter of both endpoints,
/tokenize, /detokenize, headers and bodies. Each case gets a 4xx OpenAI error body naming the field, or a
correct 200; never a 5xx or a dropped connection; and a greedy request answers the same before and after."""

from __future__ import annotations

import json

import httpx
import pytest

from .conftest import API_KEY

HEADERS = {"Authorization": f"Bearer {API_KEY}"}
NAN, INF = float("nan"), float("inf")
BIG = 1 << 63  # one past int64
MAX64 = (1 << 63) - 1
SURROGATE = "abc \ud800 def"
LONG = "Once upon a time " * 300  # well past the model's 512 positions

CMPL = {"prompt": "Hello", "max_tokens": 4}
CHAT = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}


def body(base: dict, **fields) -> dict:
    return {**base, **fields}


def dumps(obj: object) -> bytes:
    """JSON as Python writes it: NaN and Infinity literals, lone surrogates as \\ud800 escapes."""
    return json.dumps(obj, allow_nan=True).encode()


# (id, path, body, expected status, the field the error must name; None = a 200 case or a body-level error)
CASES: list[tuple[str, str, object, int, str | None]] = []


def case(name: str, path: str, payload: object, status: int, field: str | None = None) -> None:
    CASES.append((name, path, payload, status, field))


def sampling_cases(tag: str, path: str, base: dict) -> None:
    """Parameters both endpoints share."""
    bad = {
        "n": [BIG, MAX64, 257, 0, -1, "x", 1.5, None],
        "temperature": [NAN, INF, -INF, 1e999, -1, "hot", [1]],
        "top_p": [NAN, INF, 0, 1.5, -0.1],
        "top_k": [0, -2, BIG, 1.5],
        "min_p": [NAN, -0.1, 1.1, INF],
        "presence_penalty": [NAN, 3, -INF],
        "frequency_penalty": [NAN, 2.5, 1e999],
        "repetition_penalty": [0, -1, NAN, INF],
        "seed": [BIG, -BIG - 1, 1e20, "s"],
        "min_tokens": [-1, 5, BIG],
        "logit_bias": [{"1": NAN}, {"1": 101}, {"abc": 1}, {"-1": 1}, {"99999999": 1}, {"1": "x"}, [1]],
        "stop": ["", [""], 5, [SURROGATE], [["a"]]],
        "stop_token_ids": [[-1], [BIG], [99999999], "1"],
        "user": [5, SURROGATE],
        "priority": [BIG, "high"],
        "cache_salt": [SURROGATE, 3],
        "stream": ["maybe", [True]],
        "ignore_eos": ["maybe"],
        "model": [5],
    }
    for field, values in bad.items():
        for i, v in enumerate(values):
            case(f"{tag}-{field}-{i}", path, body(base, **{field: v}), 400, field)
    good = {
        "temperature": [1e-300, 1e300, 0.7],
        "top_p": [1e-300],
        "top_k": [10**6],
        "repetition_penalty": [1e300, 1e-3],
        "seed": [MAX64, -(1 << 63)],
        "logit_bias": [{"5": 100, "6": -100}],
        "frequency_penalty": [2],
        "n": [2],
        "user": ["alice"],
        "some_vendor_extra": [{"x": 1}],
        "prompt_cache_key": ["k"],
        "safety_identifier": ["u"],
        "response_format": [
            {"type": "text"},
            {"type": "json_object"},
            {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}},
        ],
        "structured_outputs": [{"regex": "[a-z]+"}, {"choice": ["a", "b"]}],
    }
    for field, values in good.items():
        for i, v in enumerate(values):
            case(f"{tag}-ok-{field}-{i}", path, body(base, **{field: v}), 200)
    case(f"{tag}-model-unknown", path, body(base, model="nope"), 404, "model")
    case(
        f"{tag}-stream_options-without-stream",
        path,
        body(base, stream_options={"include_usage": True}),
        400,
        "stream_options",
    )
    case(
        f"{tag}-stream_options-obfuscation",
        path,
        body(base, stream=True, stream_options={"include_obfuscation": True}),
        400,
        "include_obfuscation",
    )
    for extra in ("guided_json", "guided_regex", "guided_choice", "structured_outputs", "use_beam_search"):
        case(f"{tag}-vllm-extra-{extra}", path, body(base, **{extra: {"type": "object"}}), 400, extra)
    case(
        f"{tag}-response_format-schema-invalid",
        path,
        body(
            base, response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 5}}}
        ),
        400,
        "response_format",
    )
    case(
        f"{tag}-structured_outputs-unknown-field",
        path,
        body(base, structured_outputs={"regex": "a", "backend_options": 1}),
        400,
        "structured_outputs.backend_options",
    )


# ---- /v1/completions ----------------------------------------------------------------------------------
C = "/v1/completions"
sampling_cases("cmpl", C, CMPL)
for i, v in enumerate([BIG, 300, 0, "x"]):
    case(f"cmpl-best_of-{i}", C, body(CMPL, best_of=v), 400, "best_of")
case("cmpl-best_of-below-n", C, body(CMPL, n=2, best_of=1), 400, "best_of")
case("cmpl-ok-best_of", C, body(CMPL, n=2, best_of=3, temperature=1.0), 200)
for i, v in enumerate([0, -1, BIG, 10**6, "x"]):
    case(f"cmpl-max_tokens-{i}", C, body(CMPL, max_tokens=v), 400, "max_tokens")
for i, v in enumerate([21, -1, BIG, "x"]):
    case(f"cmpl-logprobs-{i}", C, body(CMPL, logprobs=v), 400, "logprobs")
case("cmpl-ok-logprobs", C, body(CMPL, logprobs=5, echo=True), 200)
case("cmpl-echo-bad", C, body(CMPL, echo="maybe"), 400, "echo")
case("cmpl-suffix", C, body(CMPL, suffix="the end"), 400, "suffix")
case("cmpl-ok-suffix-empty", C, body(CMPL, suffix=""), 200)
for i, v in enumerate(
    [
        "",
        [],
        [[]],
        SURROGATE,
        [SURROGATE],
        [1, -1],
        [BIG],
        [99999999],
        [["a"]],
        5,
        None,
        {"a": 1},
        [1.5],
        LONG,
        [LONG],
    ]
):
    case(f"cmpl-prompt-{i}", C, body(CMPL, prompt=v), 400, "prompt")
case("cmpl-prompt-missing", C, {"max_tokens": 4}, 400, "prompt")
case("cmpl-ok-prompt-ids", C, body(CMPL, prompt=[1, 2, 3]), 200)
case("cmpl-ok-prompt-batch", C, body(CMPL, prompt=["a", "b"]), 200)
case("cmpl-ok-prompt-unicode", C, body(CMPL, prompt="héllo 日本 🙂"), 200)
case("cmpl-ok-stream", C, body(CMPL, stream=True, stream_options={"include_usage": True}), 200)

# ---- /v1/chat/completions -----------------------------------------------------------------------------
H = "/v1/chat/completions"
sampling_cases("chat", H, CHAT)


def msgs(*messages: dict) -> dict:
    return body(CHAT, messages=list(messages))


for i, (m, field) in enumerate(
    [
        ([], "messages"),
        ("hi", "messages"),
        ([{"role": "wizard", "content": "x"}], "messages[0].role"),
        ([{"content": "x"}], "messages[0].role"),
        ([{"role": "user", "content": SURROGATE}], "messages[0].content"),
        (
            [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
            "messages[0].content",
        ),
        ([{"role": "user", "content": [{"type": "text", "text": SURROGATE}]}], "messages[0].content"),
        ([{"role": "user", "content": [{"text": "no type"}]}], "messages[0].content"),
        ([{"role": "user", "content": 5}], "messages[0].content"),
        ([{"role": "user", "content": "hi", "name": SURROGATE}], "messages[0].name"),
        (
            [{"role": "assistant", "content": None, "tool_calls": [{"id": "1", "type": "function"}]}],
            "messages[0].tool_calls",
        ),
        ([{"role": "user", "content": LONG}], "messages"),
        ([None], "messages[0]"),
    ]
):
    case(f"chat-messages-{i}", H, body(CHAT, messages=m), 400, field)
case("chat-messages-missing", H, {"max_tokens": 4}, 400, "messages")
case("chat-ok-content-parts", H, msgs({"role": "user", "content": [{"type": "text", "text": "hi"}]}), 200)
case(
    "chat-ok-roles",
    H,
    msgs(
        {"role": "system", "content": "s"},
        {"role": "developer", "content": "d"},
        {"role": "user", "content": "u"},
        {"role": "assistant", "content": None},
        {"role": "tool", "content": "t", "tool_call_id": "1"},
    ),
    200,
)
unsupported = {
    # this model's template has no tool-call format: auto cannot read calls; no tools: nothing to choose
    "tools": [[TOOL]],
    "tool_choice": ["auto", "required", {"type": "function", "function": {"name": "f"}}],
    "functions": [[TOOL["function"]]],
    "function_call": ["auto"],
    "audio": [{"voice": "alloy", "format": "wav"}],
    "modalities": [["text", "audio"]],
    "prediction": [{"type": "content", "content": "x"}],
    "reasoning_effort": ["low"],
    "verbosity": ["low"],
    "web_search_options": [{}],
    "store": [True],
    "metadata": [{"a": "b"}],
    "service_tier": ["flex"],
    "echo": [True],
}
for field, values in unsupported.items():
    for i, v in enumerate(values):
        case(f"chat-unsupported-{field}-{i}", H, body(CHAT, **{field: v}), 400, field)
for field, v in {
    "tools": [],
    "tool_choice": "none",
    "parallel_tool_calls": True,
    "store": False,
    "service_tier": "auto",
    "modalities": ["text"],
    "metadata": {},
    "audio": None,
    "echo": False,
}.items():
    case(f"chat-ok-noop-{field}", H, body(CHAT, **{field: v}), 200)
for i, v in enumerate([0, BIG, 10**6]):
    case(f"chat-max_tokens-{i}", H, body(CHAT, max_tokens=v), 400, "max_tokens")
    case(
        f"chat-max_completion_tokens-{i}",
        H,
        body(CHAT, max_completion_tokens=v),
        400,
        "max_completion_tokens" if i < 2 else "max_tokens",
    )
case("chat-logprobs-bad", H, body(CHAT, logprobs="x"), 400, "logprobs")
for i, v in enumerate([21, -1, BIG]):
    case(f"chat-top_logprobs-{i}", H, body(CHAT, logprobs=True, top_logprobs=v), 400, "top_logprobs")
case("chat-top_logprobs-without-logprobs", H, body(CHAT, top_logprobs=2), 400, "top_logprobs")
case("chat-ok-logprobs", H, body(CHAT, logprobs=True, top_logprobs=3), 200)
case("chat-chat_template_kwargs", H, body(CHAT, chat_template_kwargs="x"), 400, "chat_template_kwargs")
case("chat-add_generation_prompt", H, body(CHAT, add_generation_prompt="x"), 400, "add_generation_prompt")
case("chat-ok-stream-n2", H, body(CHAT, stream=True, n=2), 200)

# ---- /tokenize and /detokenize ------------------------------------------------------------------------
T, D = "/tokenize", "/detokenize"
case("tokenize-empty-body", T, {}, 400, "prompt")
case("tokenize-both", T, {"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, 400, "prompt")
for i, v in enumerate([5, SURROGATE, ["a"], None]):
    case(f"tokenize-prompt-{i}", T, {"prompt": v, **({"messages": None} if v is None else {})}, 400, "prompt")
case("tokenize-messages-role", T, {"messages": [{"role": "x", "content": "b"}]}, 400, "messages[0].role")
case(
    "tokenize-messages-surrogate",
    T,
    {"messages": [{"role": "user", "content": SURROGATE}]},
    400,
    "messages[0].content",
)
case("tokenize-add_special_tokens", T, {"prompt": "a", "add_special_tokens": "x"}, 400, "add_special_tokens")
case("tokenize-model", T, {"prompt": "a", "model": "nope"}, 404, "model")
case("tokenize-ok", T, {"prompt": "hello", "some_vendor_extra": 1}, 200)
case("tokenize-ok-messages", T, {"messages": [{"role": "user", "content": "hello"}]}, 200)
for i, v in enumerate([[-1], [BIG], [99999999], "abc", [1.5], [None], None]):
    case(f"detokenize-tokens-{i}", D, {"tokens": v}, 400, "tokens")
case("detokenize-missing", D, {}, 400, "tokens")
case("detokenize-model", D, {"tokens": [1], "model": 3}, 400, "model")
case("detokenize-ok", D, {"tokens": [1, 2, 3]}, 200)
case("detokenize-ok-empty", D, {"tokens": []}, 200)


@pytest.fixture(scope="module")
def greedy_before(server):
    return greedy(server)


def greedy(server) -> str:
    r = httpx.post(
        f"{server.url}/v1/completions",
        json={"prompt": "Once upon a time", "max_tokens": 24, "temperature": 0},
        headers=HEADERS,
        timeout=60,
    )
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def check_error(r: httpx.Response, status: int, field: str | None) -> None:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], err
    if field is not None:
        # the field itself, or a part of it ("logit_bias.1", "stop[0]")
        assert err["param"] == field or err["param"].startswith((f"{field}.", f"{field}[")), err
        assert field.split("[")[0].split(".")[-1] in err["message"], err


def check_ok(path: str, r: httpx.Response) -> None:
    assert r.status_code == 200, r.text
    if r.headers["content-type"].startswith("text/event-stream"):
        events = [line for line in r.text.split("\n\n") if line]
        assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)
        assert not any('"error"' in e for e in events)
        return
    data = r.json()
    if path.startswith("/v1"):
        assert data["choices"] and all(c["finish_reason"] in ("length", "stop") for c in data["choices"])
    elif path == "/tokenize":
        assert data["count"] == len(data["tokens"])
    else:
        assert isinstance(data["prompt"], str)


def test_greedy_before(greedy_before):
    assert greedy_before


def test_suite_is_large():
    assert len(CASES) >= 150 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize(
    ("path", "payload", "status", "field"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_bad_input(server, path, payload, status, field):
    r = httpx.post(
        f"{server.url}{path}",
        content=dumps(payload),
        headers={**HEADERS, "Content-Type": "application/json"},
        timeout=60,
    )
    if status == 200:
        check_ok(path, r)
    else:
        check_error(r, status, field)


RAW_CASES = [
    # (id, method, path, headers, content, status)
    ("no-key", "POST", C, {}, dumps(CMPL), 401),
    ("wrong-key", "POST", C, {"Authorization": "Bearer nope"}, dumps(CMPL), 401),
    ("bare-bearer", "POST", C, {"Authorization": "Bearer"}, dumps(CMPL), 401),
    ("basic-auth", "POST", H, {"Authorization": "Basic dGVzdA=="}, dumps(CHAT), 401),
    ("not-json", "POST", C, HEADERS, b"{", 400),
    ("json-null", "POST", C, HEADERS, b"null", 400),
    ("json-list", "POST", C, HEADERS, b"[]", 400),
    ("json-number", "POST", H, HEADERS, b"5", 400),
    ("empty-body", "POST", H, HEADERS, b"", 400),
    ("invalid-utf8", "POST", C, HEADERS, b'{"prompt": "\xff\xfe", "max_tokens": 4}', 400),
    ("deep-nesting", "POST", C, HEADERS, b'{"prompt": ' + b"[" * 100000 + b"]" * 100000 + b"}", 400),
    ("text-plain", "POST", C, {**HEADERS, "Content-Type": "text/plain"}, dumps(CMPL), 400),
    ("too-large", "POST", C, HEADERS, dumps({"prompt": "x" * (2 << 20)}), 413),
    ("get-completions", "GET", C, HEADERS, None, 405),
    ("unknown-route", "POST", "/v1/nope", HEADERS, dumps(CMPL), 404),
    ("tokenize-not-json", "POST", T, {}, b"{]", 400),
    ("detokenize-list", "POST", D, {}, b"[1, 2]", 400),
]


@pytest.mark.parametrize(
    ("method", "path", "headers", "content", "status"),
    [c[1:] for c in RAW_CASES],
    ids=[c[0] for c in RAW_CASES],
)
def test_bad_headers_and_bodies(server, method, path, headers, content, status):
    headers = {"Content-Type": "application/json", **headers}
    r = httpx.request(method, f"{server.url}{path}", content=content, headers=headers, timeout=60)
    check_error(r, status, None)


def test_chunked_body_over_the_limit_gets_413(server):
    def chunks():
        for _ in range(40):
            yield b"x" * (64 << 10)  # 2.5 MiB in all, no Content-Length

    r = httpx.post(
        f"{server.url}{C}",
        content=chunks(),
        headers={**HEADERS, "Content-Type": "application/json"},
        timeout=60,
    )
    check_error(r, 413, None)


def test_chat_over_the_context_reports_what_is_left(server):
    r = httpx.post(
        f"{server.url}{H}",
        json=body(CHAT, messages=[{"role": "user", "content": LONG}], max_tokens=None),
        headers=HEADERS,
        timeout=60,
    )
    check_error(r, 400, "messages")
    message = r.json()["error"]["message"]
    assert "-" not in message.replace("max-", "") and "no room" in message


def test_greedy_after(server, greedy_before):
    """Nothing above changed what the engine answers; the vendor extra was logged once, not per request."""
    assert greedy(server) == greedy_before
    assert httpx.get(f"{server.url}/health").status_code == 200
    logged = [line for line in server.output().splitlines() if "Ignoring request fields" in line]
    assert len(logged) == 1 and "some_vendor_extra" in logged[0]


def test_cors_only_for_allowed_origins(server):
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
    ok = httpx.options(f"{server.url}{C}", headers={"Origin": "http://app.example", **preflight})
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "http://app.example"
    other = httpx.options(f"{server.url}{C}", headers={"Origin": "http://elsewhere.example", **preflight})
    assert other.status_code == 400 and "access-control-allow-origin" not in other.headers
    r = httpx.post(f"{server.url}{C}", json=CMPL, headers={**HEADERS, "Origin": "http://app.example"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://app.example"
