"""Structured outputs offline: formats hold, speculation (ngram, draft) and preemption leave constrained
greedy output unchanged, bad formats are ValueErrors naming the field before anything is queued."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from kvloom import LLM, SamplingParams
from kvloom.sampling_params import StructuredOutputsParams

from ..models.reference import save_random_model
from .test_speculative_decoding import _tiny_llama

SCHEMA = {
    "type": "object",
    "properties": {
        "hero": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 1, "maximum": 99},
        "pets": {"type": "array", "items": {"enum": ["cat", "dog", "bird"]}, "minItems": 1, "maxItems": 2},
    },
    "required": ["hero", "age", "pets"],
    "additionalProperties": False,
}
PROMPTS = [
    "Once upon a time there was a little girl named Lily. Once upon a time there was",
    "Tom had a red ball. Tom had a red ball. Tom had a",
    "The sun",
]


def _json(**kw) -> SamplingParams:
    return SamplingParams(max_tokens=80, structured_outputs=StructuredOutputsParams(json=SCHEMA), **kw)


@pytest.fixture(scope="module")
def plain(stories):
    return LLM(str(stories), dtype="float32", show_progress=False)


@pytest.fixture(scope="module")
def random_draft(tmp_path_factory, stories):
    """A random draft with stories260K's vocabulary (test_speculative_decoding's shape)."""
    folder = tmp_path_factory.mktemp("so-draft")
    save_random_model(_tiny_llama(512, bos_token_id=1, eos_token_id=2), folder, stories, seed=3)
    return folder


def test_formats_hold_when_sampling(plain):
    outs = plain.generate(PROMPTS, _json(temperature=1.0, seed=7))
    for o in outs:
        assert o.outputs[0].finish_reason == "stop", o.outputs[0].text
        jsonschema.validate(json.loads(o.outputs[0].text), SCHEMA)
    regex = SamplingParams(temperature=1.0, max_tokens=20, structured_outputs={"regex": "[a-z]+ [0-9]{2}"})
    assert all(re.fullmatch("[a-z]+ [0-9]{2}", o.outputs[0].text) for o in plain.generate(PROMPTS, regex))
    choice = SamplingParams(
        temperature=1.0, max_tokens=20, n=3, structured_outputs={"choice": ["red", "blue"]}
    )
    for o in plain.generate(PROMPTS, choice):
        assert {c.text for c in o.outputs} <= {"red", "blue"}
    grammar = 'root ::= "x" [0-9] [0-9]? | "y"'
    gram = SamplingParams(temperature=1.0, max_tokens=20, structured_outputs={"grammar": grammar})
    assert all(re.fullmatch("x[0-9][0-9]?|y", o.outputs[0].text) for o in plain.generate(PROMPTS, gram))


def test_on_off_unconstrained_requests_unchanged(plain):
    """A constrained request in the batch changes nothing for the others."""
    alone = plain.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=30))
    engine = plain.engine
    engine.add_request("c", PROMPTS[0], _json(temperature=0))
    for i, p in enumerate(PROMPTS):
        engine.add_request(str(i), p, SamplingParams(temperature=0, max_tokens=30))
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0]
    assert [done[str(i)].token_ids for i in range(len(PROMPTS))] == [o.outputs[0].token_ids for o in alone]
    jsonschema.validate(json.loads(done["c"].text), SCHEMA)


def _greedy_json(llm: LLM, prompts: list[str] = PROMPTS) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, _json(temperature=0))]


def _speculating(stories, method: str, draft=None) -> LLM:  # noqa: ANN001
    spec = {"speculative_method": method, "num_speculative_tokens": 3, "adaptive_speculation": False}
    if draft is not None:
        spec["speculative_model"] = str(draft)
    return LLM(str(stories), dtype="float32", show_progress=False, **spec)


@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_speculation_keeps_constrained_greedy_output(stories, plain, random_draft, method):
    llm = _speculating(stories, method, random_draft if method == "draft" else None)
    assert _greedy_json(llm) == _greedy_json(plain)
    assert llm.engine.proposer.stats.num_drafts > 0  # it did speculate


def test_preemption_keeps_the_grammar_state(stories, plain):
    expected = _greedy_json(plain, PROMPTS * 2)
    small = LLM(
        str(stories),
        dtype="float32",
        show_progress=False,
        num_kv_blocks=8,
        max_model_len=128,
        max_num_batched_tokens=32,
    )
    got = _greedy_json(small, PROMPTS * 2)
    assert small.engine.scheduler.num_preemptions > 0
    assert got == expected


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"json": {"type": "nope"}}, "structured_outputs: the json does not compile"),
        ({"regex": "("}, "structured_outputs: the regex does not compile"),
        ({"grammar": 'root ::= ("a"'}, "structured_outputs: the grammar does not compile"),
        ({"regex": "a", "choice": ["b"]}, "structured_outputs: give exactly one"),
        ({}, "structured_outputs: give exactly one"),
        ({"choice": "ab"}, "structured_outputs.choice"),
        ({"json": 3}, "structured_outputs.json"),
        ({"bogus": 1}, "structured_outputs"),
    ],
)
def test_bad_formats_are_value_errors(plain, spec, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        plain.engine.add_request("bad", "Hi", SamplingParams(structured_outputs=spec))
    assert not plain.engine.has_unfinished_requests()


def test_a_draft_proposes_within_the_format(stories, plain):
    """A draft that is the target itself proposes what the target will choose, within the format too:
    nearly every proposal is accepted (unconstrained, its proposals leave the format and are rejected)."""
    llm = _speculating(stories, "draft", stories)
    assert _greedy_json(llm) == _greedy_json(plain)
    assert llm.engine.proposer.stats.acceptance_rate > 0.9
