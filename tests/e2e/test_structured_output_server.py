"""Structured output through a real server and the official openai client: chat.completions.parse with a pydantic
model for the base model and an adapter, in one concurrent batch with free requests; 20 random JSON schemas whose
outputs validate; json_object; vLLM's guided_* and structured_outputs; streaming; bad schemas are 400s."""
from __future__ import annotations

import concurrent.futures
import json
import random
import re
from typing import Annotated

import httpx
import openai
import pytest
from pydantic import BaseModel, Field

from tests.e2e.conftest import smol_server

pytestmark = pytest.mark.e2e
jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("xgrammar")


class City(BaseModel):
    """Bounded, as a schema for a 135M model must be: unbounded lists and strings ramble to max_tokens."""
    name: str = Field(max_length=30)
    country: str = Field(max_length=30)
    population: int
    landmarks: list[Annotated[str, Field(max_length=30)]] = Field(max_length=3)


@pytest.fixture(scope="module")
def server(default_model_dir, quill_adapter):
    srv = smol_server(default_model_dir, "--max-model-len", "1024", "--max-num-seqs", "32",
                      "--lora-modules", f"quill={quill_adapter}", dtype="bfloat16")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=300)


MESSAGES = [{"role": "user", "content": "Describe Paris as JSON."}]


def test_parse_with_pydantic_for_base_and_adapter_beside_free_requests(client):
    def parse(model: str, seed: int):
        return client.chat.completions.parse(model=model, messages=MESSAGES, response_format=City, max_tokens=200,
                                             temperature=0.7, seed=seed)

    def free(model: str, seed: int):
        return client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=40, temperature=0.9, seed=seed)

    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        parsed = [pool.submit(parse, m, i) for i, m in enumerate(["smol", "quill"] * 3)]
        free_ones = [pool.submit(free, m, i) for i, m in enumerate(["smol", "quill"] * 3)]
        for f in parsed:
            message = f.result().choices[0].message
            assert isinstance(message.parsed, City), message.content
        for f in free_ones:
            assert f.result().choices[0].message.content


def random_schema(rng: random.Random, depth: int = 0) -> dict:
    """Small, bounded schemas: nested objects, arrays, enums, bounded numbers and strings."""
    kinds = ["string", "integer", "number", "boolean", "enum"] + (["object", "array"] if depth < 2 else [])
    kind = rng.choice(kinds)
    if kind == "string":
        return {"type": "string", "maxLength": rng.randint(3, 20)}
    if kind == "integer":
        low = rng.randint(-50, 50)
        return {"type": "integer", "minimum": low, "maximum": low + rng.randint(0, 1000)}
    if kind == "number":
        return {"type": "number", "minimum": 0, "maximum": rng.choice([1, 10, 1e6])}
    if kind == "boolean":
        return {"type": "boolean"}
    if kind == "enum":
        return {"enum": rng.sample(["red", "green", "blue", "cyan", "amber", 3, 7], rng.randint(1, 4))}
    if kind == "array":
        return {"type": "array", "items": random_schema(rng, depth + 1), "minItems": 1, "maxItems": 3}
    names = rng.sample(["id", "name", "size", "kind", "tags", "owner", "score", "meta"], rng.randint(1, 4))
    return {"type": "object", "properties": {n: random_schema(rng, depth + 1) for n in names},
            "required": names, "additionalProperties": False}


def test_twenty_random_schemas_validate(client):
    rng = random.Random(2026)
    schemas = [{"type": "object", "properties": {"answer": random_schema(rng), "note": random_schema(rng)},
                "required": ["answer", "note"], "additionalProperties": False} for _ in range(20)]

    def ask(i: int) -> str:
        r = client.chat.completions.create(
            model="smol" if i % 2 else "quill", messages=MESSAGES, max_tokens=400, temperature=0.8, seed=i,
            response_format={"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schemas[i],
                                                                     "strict": True}})
        assert r.choices[0].finish_reason == "stop", r.choices[0]
        return r.choices[0].message.content

    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        outputs = list(pool.map(ask, range(20)))
    for schema, text in zip(schemas, outputs):
        jsonschema.validate(json.loads(text), schema)


def test_json_object_guided_and_structured_outputs(client, server):
    r = client.chat.completions.create(model="smol", messages=MESSAGES, max_tokens=200, temperature=0.7, seed=1,
                                       response_format={"type": "json_object"})
    assert isinstance(json.loads(r.choices[0].message.content), dict)
    url = server.base_url + "/v1/completions"
    base = {"model": "quill", "prompt": "The best colour is", "max_tokens": 20, "temperature": 0.9, "seed": 2}
    body = httpx.post(url, json=base | {"guided_choice": ["red", "green", "blue"]}, timeout=120).json()
    assert body["choices"][0]["text"] in ("red", "green", "blue")
    body = httpx.post(url, json=base | {"guided_regex": r"#[0-9a-f]{6}"}, timeout=120).json()
    assert re.fullmatch(r"#[0-9a-f]{6}", body["choices"][0]["text"])
    body = httpx.post(url, json=base | {"structured_outputs": {"choice": ["up", "down"]}}, timeout=120).json()
    assert body["choices"][0]["text"] in ("up", "down")
    body = httpx.post(url, json=base | {"guided_grammar": 'root ::= "rgb(" [0-9]+ ", " [0-9]+ ", " [0-9]+ ")"'},
                      timeout=120).json()
    assert re.fullmatch(r"rgb\(\d+, \d+, \d+\)", body["choices"][0]["text"])


def test_streamed_schema_output(client):
    stream = client.chat.completions.create(
        model="quill", messages=MESSAGES, max_tokens=200, temperature=0.7, seed=4, stream=True,
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": City.model_json_schema()}})
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    City.model_validate_json(text)


def test_bad_constraints_are_400_and_change_nothing(client):
    bad = [{"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objectx"}}}},
           {"response_format": {"type": "json_schema"}},
           {"guided_regex": "(unclosed"},
           {"guided_grammar": "root ::= undefined_rule"},
           {"guided_choice": []},
           {"guided_choice": ["a"], "guided_regex": "b"}]
    for extra in bad:
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model="smol", messages=MESSAGES, max_tokens=5, extra_body=extra)
        assert err.value.body["param"] in ("response_format", "guided_regex", "guided_grammar", "guided_choice"), extra
    assert client.chat.completions.create(model="smol", messages=MESSAGES, max_tokens=3).choices[0].message.content


WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 30}, "unit": {"enum": ["C", "F"]}},
    "required": ["city", "unit"], "additionalProperties": False}}}
CONVERT = {"type": "function", "function": {"name": "convert", "description": "Convert an amount of money", "parameters": {
    "type": "object", "properties": {"amount": {"type": "number", "minimum": 0, "maximum": 1e6},
                                     "to": {"type": "string", "maxLength": 3}},
    "required": ["amount", "to"], "additionalProperties": False}}}
ASK = [{"role": "user", "content": "What is the weather in Paris, and what are 20 dollars in euros?"}]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("model", ["smol", "quill"])
def test_required_and_named_tool_calls_have_valid_arguments(client, model, stream):
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, CONVERT)}

    def calls_of(**kw) -> list:
        r = client.chat.completions.create(model=model, messages=ASK, tools=[WEATHER, CONVERT], max_tokens=120,
                                           temperature=0.7, seed=5, stream=stream, **kw)
        if not stream:
            assert r.choices[0].finish_reason == "tool_calls"
            return r.choices[0].message.tool_calls
        chunks = [c for c in r if c.choices]
        assert chunks[-1].choices[0].finish_reason == "tool_calls"
        return [tc for c in chunks for tc in c.choices[0].delta.tool_calls or ()]

    for call in calls_of(tool_choice="required"):
        jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])
    (call,) = calls_of(tool_choice={"type": "function", "function": {"name": "convert"}})
    assert call.function.name == "convert"
    jsonschema.validate(json.loads(call.function.arguments), schemas["convert"])


def test_conversation_with_tool_results_continues(client):
    first = client.chat.completions.create(model="smol", messages=ASK, tools=[WEATHER], tool_choice="required",
                                           max_tokens=80, temperature=0)
    call = first.choices[0].message.tool_calls[0]
    messages = ASK + [first.choices[0].message.model_dump(exclude_none=True),
                      {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21, "sky": "clear"}'}]
    answer = client.chat.completions.create(model="smol", messages=messages, tools=[WEATHER], max_tokens=30,
                                            temperature=0)
    assert answer.choices[0].message.content or answer.choices[0].message.tool_calls
