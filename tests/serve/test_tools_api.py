"""Tool calling over HTTP on the fake engine (the answer is scripted): the prompt, the parsing of auto, required
and named answers into tool_calls, streamed deltas, tool turns in the conversation, and the 400s."""
from __future__ import annotations

import json

import openai
import pytest
from starlette.testclient import TestClient

from loraplex.serve.app import build_app
from loraplex.serve.tools import FALLBACK_PROMPT
from tests.serve.fake_engine import MODEL_NAME, FakeEngine

pytest.importorskip("xgrammar")
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
ASK = [{"role": "user", "content": "Weather in Paris?"}]


def last(engine: FakeEngine):
    return list(engine.requests.values())[-1]


def client_for(reply: str) -> tuple[openai.OpenAI, FakeEngine]:
    engine = FakeEngine(reply, max_model_len=8192)
    http = TestClient(build_app(engine, [MODEL_NAME]), raise_server_exceptions=False)
    http.__enter__()
    return openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=http, max_retries=0), engine


def test_auto_parses_hermes_blocks_and_keeps_the_text():
    oai, engine = client_for('Let me check. <tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}'
                             '</tool_call>')
    r = oai.chat.completions.create(model=MODEL_NAME, messages=ASK, tools=[WEATHER, TIME])
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Let me check."
    (call,) = choice.message.tool_calls
    assert call.id.startswith("call_") and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    prompt = engine.tokenizer.decode(last(engine).prompt_token_ids)
    assert "get_weather" in prompt and "<tool_call>" in prompt  # the fallback prompt (this template has no tools)
    assert last(engine).params.structured_output is None  # auto: free


def test_auto_plain_answer_and_unknown_function_stay_text():
    for reply in ("It is sunny.", '{"name": "launch_rocket", "arguments": {}}'):
        oai, _ = client_for(reply)
        choice = oai.chat.completions.create(model=MODEL_NAME, messages=ASK, tools=[WEATHER]).choices[0]
        assert choice.message.tool_calls is None and choice.message.content == reply and choice.finish_reason == "stop"


def test_required_and_named_are_constrained_and_parsed():
    oai, engine = client_for('[{"name": "get_weather", "arguments": {"city": "Oslo"}}, {"name": "get_time", '
                             '"arguments": {}}]')
    r = oai.chat.completions.create(model=MODEL_NAME, messages=ASK, tools=[WEATHER, TIME], tool_choice="required")
    assert [c.function.name for c in r.choices[0].message.tool_calls] == ["get_weather", "get_time"]
    schema = json.loads(last(engine).params.structured_output.value)
    assert schema["type"] == "array" and len(schema["items"]["anyOf"]) == 2 and "maxItems" not in schema
    r = oai.chat.completions.create(model=MODEL_NAME, messages=ASK, tools=[WEATHER, TIME], tool_choice="required",
                                    parallel_tool_calls=False)
    assert len(r.choices[0].message.tool_calls) == 1
    assert json.loads(last(engine).params.structured_output.value)["maxItems"] == 1

    oai, engine = client_for('{"city": "Lima"}')
    r = oai.chat.completions.create(model=MODEL_NAME, messages=ASK, tools=[WEATHER, TIME],
                                    tool_choice={"type": "function", "function": {"name": "get_weather"}})
    (call,) = r.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Lima"}
    assert json.loads(last(engine).params.structured_output.value) == WEATHER["function"]["parameters"]
    assert last(engine).params.structured_output.strict  # strict unless the tool says strict: false
    loose = {"type": "function", "function": {**WEATHER["function"], "strict": False}}
    oai.chat.completions.create(model=MODEL_NAME, messages=ASK, tools=[loose],
                                tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert not last(engine).params.structured_output.strict
    assert r.choices[0].message.content is None and r.choices[0].finish_reason == "tool_calls"


def test_streamed_tool_calls_in_openai_chunk_shape():
    oai, _ = client_for('<tool_call>{"name": "get_weather", "arguments": {"city": "Rome"}}</tool_call>')
    chunks = list(oai.chat.completions.create(model=MODEL_NAME, messages=ASK, tools=[WEATHER], stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    calls = [tc for d in deltas for tc in d.tool_calls or ()]
    assert len(calls) == 1 and calls[0].index == 0 and calls[0].function.name == "get_weather"
    assert json.loads(calls[0].function.arguments) == {"city": "Rome"} and calls[0].id.startswith("call_")
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_a_conversation_with_tool_results_continues():
    oai, engine = client_for("It is 21 degrees in Paris.")
    messages = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21}'}]
    r = oai.chat.completions.create(model=MODEL_NAME, messages=messages, tools=[WEATHER])
    assert r.choices[0].message.content == "It is 21 degrees in Paris." and r.choices[0].finish_reason == "stop"
    prompt = engine.tokenizer.decode(last(engine).prompt_token_ids)
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>' in prompt
    assert '{"temperature": 21}' in prompt and FALLBACK_PROMPT.split("\n")[0] in prompt


@pytest.mark.parametrize("extra,param", [
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [WEATHER, WEATHER]}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools[0].function.name"),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0]"),
])
def test_bad_tool_requests_are_400(extra, param):
    oai, _ = client_for("x")
    body = {"messages": ASK} | extra
    with pytest.raises(openai.BadRequestError) as err:
        oai.chat.completions.create(model=MODEL_NAME, **body)
    assert err.value.body["param"] == param, err.value.body
