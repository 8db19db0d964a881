"""Structured output in the engine: each constrained row gets its grammar's token bitmask in the batched sampler,
beside free rows; grammars compile off the step loop; JSON schema, JSON object, regex, choice and EBNF."""
from __future__ import annotations

import json
import re

import pytest
import torch

from loraplex.engine.core.sampling_params import SamplingParams, StructuredOutput
from loraplex.engine.layers.sampler import unpack_token_bitmask
from tests.engine.test_engine import PROMPTS, encode, engine, run_all  # noqa: F401 - engine is a fixture

xgr = pytest.importorskip("xgrammar")
jsonschema = pytest.importorskip("jsonschema")

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                           "pets": {"type": "array", "items": {"enum": ["cat", "dog"]}, "maxItems": 3}},
          "required": ["name", "age", "pets"], "additionalProperties": False}


def test_unpack_token_bitmask_matches_xgrammar_layout():
    vocab = 70
    allowed = torch.rand(3, vocab) < 0.5
    bitmask = xgr.allocate_token_bitmask(3, vocab)
    bitmask.fill_(0)
    for r, t in allowed.nonzero().tolist():
        bitmask[r, t // 32] |= torch.tensor(1 << (t % 32), dtype=torch.int64).to(torch.int32)
    assert torch.equal(unpack_token_bitmask(bitmask, vocab), allowed)
    logits = torch.randn(3, vocab)
    want = logits.clone()
    xgr.apply_token_bitmask_inplace(want, bitmask)  # xgrammar's own kernel: the same -inf pattern
    assert torch.equal(logits.masked_fill(~unpack_token_bitmask(bitmask, vocab), float("-inf")), want)


def structured(kind: str, value: str = "", **kw) -> SamplingParams:
    return SamplingParams(max_tokens=kw.pop("max_tokens", 80), temperature=kw.pop("temperature", 0.8),
                          structured_output=StructuredOutput(kind, value), **kw)


def decode(engine, ids: list[int]) -> str:
    return engine.tokenizer.decode(ids, skip_special_tokens=True)


def test_constrained_and_free_rows_in_one_batch(engine):
    """Schema, JSON object, regex and choice rows, seeded random sampling, beside free greedy and random rows."""
    start = engine.scheduler.kv_cache_manager.num_free_blocks
    prompt = encode(engine, "Describe a person as JSON:")
    requests = {f"schema{i}": (prompt, structured("json_schema", json.dumps(PERSON), seed=i)) for i in range(3)}
    requests["object"] = (prompt, structured("json_object", seed=7, max_tokens=120))
    requests["regex"] = (encode(engine, "A date:"), structured("regex", r"20[0-9]{2}-(0[1-9]|1[0-2])-[0-2][0-9]", seed=1))
    requests["choice"] = (encode(engine, "Is the sky blue?"), structured("choice", json.dumps(["yes", "no", "maybe"])))
    requests |= {f"free{i}": (encode(engine, p), SamplingParams(max_tokens=16, temperature=0.0 if i % 2 else 0.9,
                                                                  seed=i)) for i, p in enumerate(PROMPTS)}
    alone = run_all(engine, {"free1": requests["free1"]})["free1"]
    out = run_all(engine, requests)
    for i in range(3):
        jsonschema.validate(json.loads(decode(engine, out[f"schema{i}"])), PERSON)
    assert isinstance(json.loads(decode(engine, out["object"])), dict)
    assert re.fullmatch(r"20[0-9]{2}-(0[1-9]|1[0-2])-[0-2][0-9]", decode(engine, out["regex"]))
    assert decode(engine, out["choice"]) in ("yes", "no", "maybe")
    assert out["free1"] == alone  # a free greedy row is untouched by its constrained neighbours
    assert engine.scheduler.kv_cache_manager.num_free_blocks == start
    assert not engine.structured_output._matchers and not engine.structured_output.has_pending


def test_grammar_ends_the_request_even_with_ignore_eos(engine):
    out = run_all(engine, {"c": (encode(engine, "Pick:"), structured("choice", json.dumps(["alpha", "beta"]),
                                                                        ignore_eos=True, temperature=0.0))})["c"]
    assert decode(engine, out) in ("alpha", "beta")


def test_ebnf_grammar_and_a_bad_grammar_aborts_only_its_request(engine):
    grammar = 'root ::= "(" [0-9]+ " + " [0-9]+ ")"'
    requests = {"g": (encode(engine, "A sum:"), structured("grammar", grammar, max_tokens=20)),
                "bad": (encode(engine, "x"), structured("grammar", "root ::= nope")),
                "free": (encode(engine, PROMPTS[0]), SamplingParams(max_tokens=5, temperature=0.0))}
    finished = {}
    for rid, (ids, params) in requests.items():
        engine.add_request(rid, ids, params)
    tokens = {rid: [] for rid in requests}
    while engine.has_unfinished_requests():
        for o in engine.step():
            tokens[o.request_id].extend(o.token_ids)
            if o.finished:
                finished[o.request_id] = o.finish_reason
    assert re.fullmatch(r"\([0-9]+ \+ [0-9]+\)", decode(engine, tokens["g"]))
    assert finished == {"g": "stop", "bad": "abort", "free": "length"}
