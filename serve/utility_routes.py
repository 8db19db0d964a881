"""vLLM's utility endpoints: POST /tokenize (a prompt, or chat messages through the chat template), POST /detokenize
and GET /version. Adapters share the base model's tokenizer, so any served name is accepted as `model`."""
from __future__ import annotations

import json
from importlib.metadata import PackageNotFoundError, version

from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from loraplex.serve.errors import InvalidRequestError
from loraplex.serve.routes import render_chat, resolve_model
from loraplex.serve.schemas import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    TokenizeResponse,
    VersionResponse,
)


async def tokenize(request: Request) -> Response:
    body = await request.body()
    try:
        parsed = json.loads(body)
    except json.JSONDecodeError:
        parsed = None  # the schema below reports the malformed JSON
    is_chat = isinstance(parsed, dict) and "messages" in parsed
    req = (TokenizeChatRequest if is_chat else TokenizeCompletionRequest).model_validate_json(body)
    state = request.app.state
    await resolve_model(state, req.model)
    tokenizer = state.engine.tokenizer
    if isinstance(req, TokenizeChatRequest):
        ids = render_chat(tokenizer, [{"role": m.role, "content": m.text()} for m in req.messages],
                          add_generation_prompt=req.add_generation_prompt,
                          continue_final_message=req.continue_final_message)
        if req.add_special_tokens and tokenizer.bos_token_id is not None and ids[:1] != [tokenizer.bos_token_id]:
            ids = [tokenizer.bos_token_id, *ids]
    else:
        ids = tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens)
    strs = tokenizer.convert_ids_to_tokens(ids) if req.return_token_strs else None
    return _json_response(TokenizeResponse(count=len(ids), max_model_len=state.engine.max_model_len, tokens=ids,
                                  token_strs=strs))


async def detokenize(request: Request) -> Response:
    req = DetokenizeRequest.model_validate_json(await request.body())
    state = request.app.state
    await resolve_model(state, req.model)
    vocab_size = state.engine.model_config.vocab_size
    if any(not 0 <= t < vocab_size for t in req.tokens):
        raise InvalidRequestError(f"token ids must be in [0, {vocab_size})", param="tokens")
    return _json_response(DetokenizeResponse(prompt=state.engine.tokenizer.decode(req.tokens)))


async def get_version(request: Request) -> Response:
    try:
        current = version("loraplex")
    except PackageNotFoundError:  # a checkout used without installing it
        current = "unknown"
    return _json_response(VersionResponse(version=current))


UTILITY_ROUTES = [
    Route("/tokenize", tokenize, methods=["POST"]),
    Route("/detokenize", detokenize, methods=["POST"]),
    Route("/version", get_version, methods=["GET"]),
]


def _json_response(body: BaseModel) -> Response:
    return Response(body.model_dump_json(), media_type="application/json")
