"""The two OpenAI endpoints served, transformers' handlers with what zip2zip adds (`_Zip2ZipHandler`):
every field checked before anything is tokenized (`request_checks`, a 400 naming the field), sampling
when the temperature asks for it, the length of a request that names none left to the model's
positions, ``prompt_lookup_num_tokens`` taken from the request, and ``usage`` and the finish reason
rewritten from the request's `RequestOutcome` (base tokens, with the compressed counts beside).
"""

from __future__ import annotations

import contextvars
import json
import re
from dataclasses import dataclass

from .request_checks import MAX_TOKENS_FIELDS, BadRequest, check_messages, check_request, sampling_requested
from .request_codebook import RequestUsage
from .seams import (
    ChatCompletionHandler,
    CompletionHandler,
    GenerationState,
    HTTPException,
    JSONResponse,
    StreamingResponse,
    TransformersCompletionCreateParamsStreaming,
    TransformersTextCompletionCreateParams,
)


__all__ = ["REQUEST_ID", "NotServed", "RequestOutcome", "Zip2ZipChatCompletionHandler", "Zip2ZipCompletionHandler"]

# The id of the request a handler is answering, for the engine to file its outcome under (5.25 on: the
# engine numbers requests its own way).
REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("zip2zip_request_id")


@dataclass(frozen=True)
class RequestOutcome:
    """What a finished request reports back to its handler."""

    usage: RequestUsage
    finish_reason: str  # "length" at max_new_tokens ids or the end of the positions, else "stop"


class _Zip2ZipHandler:
    """What both OpenAI endpoints add to transformers' handlers (a mixin, first in the bases)."""

    generation_state: GenerationState  # the server's, holding each finished request's outcome by its id

    def _validate_request(self, body: dict) -> None:
        super()._validate_request(body)  # the fields the endpoint takes (422 for others)
        try:
            check_request(body)
        except BadRequest as error:
            raise HTTPException(status_code=400, detail=str(error)) from None

    @staticmethod
    def _request_settings(body: dict) -> dict:
        """What zip2zip adds to transformers' reading of a request: the length when it names none,
        sampling when its temperature asks for it, and its prompt lookup."""
        settings = {}
        if _names_no_length(body):
            settings["max_new_tokens"] = None  # as many as fit (`_fit_to_context`)
        sampling = sampling_requested(body)
        if sampling is not None:
            settings["do_sample"] = sampling  # transformers only ever switches sampling off
        if body.get("prompt_lookup_num_tokens") is not None:
            settings["prompt_lookup_num_tokens"] = int(body["prompt_lookup_num_tokens"])
        return settings

    def _build_generation_config(self, body: dict, model_generation_config, use_cb: bool = False):
        """The request's settings (up to 5.24)."""
        config = super()._build_generation_config(body, model_generation_config, use_cb=use_cb)
        for name, value in self._request_settings(body).items():
            setattr(config, name, value)
        return config

    def _build_generation_kwargs(self, body: dict, model_generation_config) -> dict:
        """The request's settings (5.25 on), as `_build_generation_config`."""
        return {**super()._build_generation_kwargs(body, model_generation_config), **self._request_settings(body)}

    def _check_prompt_length(self, engine, inputs: dict) -> None:
        """Left to `_fit_to_context` (5.25 on), which counts the positions a prompt takes (base tokens
        by default), not its compressed ids."""

    async def handle_request(self, body: dict, request_id: str):
        outcomes = self.generation_state.outcomes
        REQUEST_ID.set(request_id)  # this request's task only
        if body.get("stream") and body.get("stream_options") is None:
            body = {**body, "stream_options": {"include_usage": True}}  # the usage ends every stream
        try:
            response = await super().handle_request(body, request_id)
        except BaseException:
            outcomes.pop(request_id, None)
            raise
        if isinstance(response, StreamingResponse):
            response.body_iterator = self._stream_with_usage(response.body_iterator, request_id)
            return response
        outcome = outcomes.pop(request_id, None)
        if outcome is None:
            return response
        return JSONResponse(_with_outcome(json.loads(response.body), outcome), status_code=response.status_code)

    async def _stream_with_usage(self, chunks, request_id: str):
        """The stream, its usage and finish reason rewritten from the outcome."""
        try:
            async for chunk in chunks:
                if _ENDING.search(chunk) and request_id in self.generation_state.outcomes:
                    chunk = _rewrite_sse(chunk, self.generation_state.outcomes[request_id])
                yield chunk
        finally:
            self.generation_state.outcomes.pop(request_id, None)


def _names_no_length(body: dict) -> bool:
    """Whether a request leaves its length open: no ``max_tokens`` field, nor a length in its
    ``generation_config`` (checked to be a JSON object by then)."""
    if any(body.get(field) is not None for field in MAX_TOKENS_FIELDS):
        return False
    text = body.get("generation_config")
    requested = json.loads(text) if isinstance(text, str) else {}
    return requested.get("max_new_tokens") is None and requested.get("max_length") is None


def _with_outcome(payload: dict, outcome: RequestOutcome) -> dict:
    """A response object with usage in base tokens (+ compressed counts) and the finish reason by steps."""
    if "usage" in payload:
        payload["usage"] = outcome.usage.to_openai()
    for choice in payload.get("choices", ()):
        if choice.get("finish_reason") in ("length", "stop"):
            choice["finish_reason"] = outcome.finish_reason
    return payload


# What the events that end a stream hold (5.25 on the finish reason and the usage come in two).
_ENDING = re.compile(r'"(usage|finish_reason)"\s*:\s*[{"]')


def _rewrite_sse(chunk: str, outcome: RequestOutcome) -> str:
    events = []
    for event in chunk.split("\n\n"):
        if event.startswith("data: {") and _ENDING.search(event):
            event = "data: " + json.dumps(
                _with_outcome(json.loads(event[len("data: ") :]), outcome), separators=(",", ":")
            )
        events.append(event)
    return "\n\n".join(events)


class Zip2ZipCompletionHandler(_Zip2ZipHandler, CompletionHandler):
    """``/v1/completions``: a text prompt, compressed by the checkpoint's tokenizer."""

    class _Params(TransformersTextCompletionCreateParams, total=False):
        prompt_lookup_num_tokens: int

    _valid_params_class = _Params


class Zip2ZipChatCompletionHandler(_Zip2ZipHandler, ChatCompletionHandler):
    """``/v1/chat/completions``: messages through the checkpoint's chat template."""

    class _Params(TransformersCompletionCreateParamsStreaming, total=False):
        prompt_lookup_num_tokens: int

    _valid_params_class = _Params

    def _validate_request(self, body: dict) -> None:
        super()._validate_request(body)
        try:
            check_messages(body.get("messages"))
        except BadRequest as error:
            raise HTTPException(status_code=400, detail=str(error)) from None

    def render_messages(self, engine, messages: list[dict], body: dict) -> dict:
        """The messages through the chat template (5.25 on), once the checkpoint is known to have one."""
        _require_chat_template(engine.processor)
        return super().render_messages(engine, messages, body)

    def _resolve_model(self, body: dict):
        """The model and its tokenizer (up to 5.24), once the checkpoint is known to have a chat template."""
        model_id, model, processor = super()._resolve_model(body)
        _require_chat_template(processor)
        return model_id, model, processor


def _require_chat_template(tokenizer) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise HTTPException(
            status_code=400,
            detail="this checkpoint's tokenizer has no chat template, so it cannot read messages: "
            "use /v1/completions with a prompt",
        )


class NotServed:
    """The endpoints of transformers serve that this server does not offer, each a 501 naming the two it does."""

    def __init__(self, endpoint: str):
        self.endpoint = endpoint

    async def handle_request(self, *args, **kwargs):
        raise HTTPException(
            status_code=501,
            detail=f"{self.endpoint} is not served for zip2zip models: use /v1/chat/completions or /v1/completions",
        )
