"""A zip2zip checkpoint behind the OpenAI API, on transformers' own server.

transformers' serving code is reused whole: its FastAPI app, request parsing, chat templates,
streaming, ``/v1/models`` and ``/health``. Three of its seams are plugged, each a subclass:

* **loading** (`Zip2ZipModelManager`): transformers resolves ``config.architectures[0]`` on its own
  module, where no remote-code model lives; here the checkpoint loads as a `Zip2ZipForCausalLM`
  with its `Zip2ZipTokenizer`;
* **generation** (`Zip2ZipGenerateManager`): each request is one `generate` call from an empty
  codebook, on transformers' inference thread (requests queue there), counted by a
  `RequestCodebook`; streamers receive base ids, decoded by the base tokenizer;
* **requests** (`Zip2ZipCompletionHandler`, `Zip2ZipChatCompletionHandler`): bad input is a 4xx
  JSON error before any generation, ``prompt_lookup_num_tokens`` is taken from the request, and
  ``usage`` counts base tokens (what the API means by tokens) with the compressed counts beside.

The seams are checked on import (`_check_seams`): a transformers release that moved one fails here,
naming itself, rather than deep in a request.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass

import transformers
from transformers import AutoTokenizer, GenerationConfig

from ..lzw_codebook import setting
from .request_codebook import RequestCodebook, RequestUsage


try:
    from transformers.cli.serving import server as _server_module  # noqa: F401  (the layout of 5.24)
    from transformers.utils.import_utils import is_serve_available
except ImportError as error:
    raise ImportError(
        f"zip2zip serve runs on transformers' serving code (transformers.cli.serving, from transformers 5.24 "
        f"on); transformers {transformers.__version__} does not have it: {error}"
    ) from None
if not is_serve_available():
    raise ImportError("serving needs FastAPI, uvicorn and openai: pip install 'zip2zip_hf[serve]'")
try:
    from fastapi import HTTPException
    from fastapi.responses import JSONResponse, StreamingResponse
    from transformers.cli.serving.chat_completion import (
        ChatCompletionHandler,
        TransformersCompletionCreateParamsStreaming,
    )
    from transformers.cli.serving.completion import CompletionHandler, TransformersTextCompletionCreateParams
    from transformers.cli.serving.model_manager import ModelManager
    from transformers.cli.serving.server import build_server
    from transformers.cli.serving.utils import (
        DirectStreamer,
        GenerateManager,
        GenerationState,
        _GenerationCancelled,
        _StreamError,
        split_revision,
    )
except ImportError as error:
    raise ImportError(
        f"transformers {transformers.__version__} moved the serving code zip2zip serve plugs into: {error}; "
        "use a release between 5.24 and the one in setup.cfg"
    ) from None


__all__ = ["Zip2ZipChatCompletionHandler", "Zip2ZipCompletionHandler", "Zip2ZipModelManager", "build_app", "serve"]

# Request fields that would change the answer and are not supported, with the values that change nothing.
_REFUSED_FIELDS = {
    "logprobs": (None, False, 0),
    "top_logprobs": (None, 0),
    "n": (None, 1),
    "best_of": (None, 1),
    "echo": (None, False),
    "presence_penalty": (None, 0),
    "response_format": (None, {"type": "text"}),
    "prediction": (None,),
}
# What each handler reads the completion's length from.
_MAX_TOKENS_FIELDS = ("max_tokens", "max_completion_tokens")
# The most new tokens a request gets when it names none (transformers serve's own default).
_DEFAULT_MAX_NEW_TOKENS = 1024


def _check_seams() -> None:
    """The transformers internals this module overrides or calls, by name."""
    needed = {
        ModelManager: ("_load_model", "_load_processor", "load_model_and_processor"),
        GenerateManager: ("generate_streaming", "generate_non_streaming", "submit", "async_submit"),
        GenerationState: ("get_manager", "use_continuous_batching"),
        CompletionHandler: ("handle_request", "_validate_request", "_build_generation_config"),
        ChatCompletionHandler: ("handle_request", "_validate_request", "_build_generation_config"),
    }
    missing = [
        f"{owner.__name__}.{name}" for owner, names in needed.items() for name in names if not hasattr(owner, name)
    ]
    if missing:
        raise ImportError(
            f"transformers {transformers.__version__} moved the serving internals zip2zip serve plugs into "
            f"({', '.join(missing)}): use a release between 5.24 and the one in setup.cfg"
        )


_check_seams()


class Zip2ZipModelManager(ModelManager):
    """transformers' model manager, loading a zip2zip checkpoint and its tokenizer (no remote code
    needed: the package is here)."""

    def _load_processor(self, model_id_and_revision: str, gguf_file: str | None = None):
        model_id, revision = split_revision(model_id_and_revision)
        return AutoTokenizer.from_pretrained(model_id, revision=revision)

    def _load_model(self, model_id_and_revision: str, tqdm_class=None, progress_callback=None, gguf_file=None):
        from ..modeling_zip2zip import Zip2ZipForCausalLM

        model_id, revision = split_revision(model_id_and_revision)
        model = Zip2ZipForCausalLM.from_pretrained(
            model_id,
            revision=revision,
            dtype=self.dtype,
            device_map=self.device,
            attn_implementation=self.attn_implementation,
        )
        return model.eval()


@dataclass(frozen=True)
class _Outcome:
    """What a finished request reports back to its handler."""

    usage: RequestUsage
    finish_reason: str  # "length" when it wrote max_new_tokens ids, else "stop"


class Zip2ZipGenerateManager(GenerateManager):
    """One `generate` call per request, on transformers' inference thread, from an empty codebook.

    The request's outcome (usage, finish reason) is left in ``outcomes`` under its request id, for
    its handler to put in the response.
    """

    def __init__(self, outcomes: dict[str, _Outcome]):
        super().__init__()
        self.outcomes = outcomes

    def generate_streaming(self, model, processor, inputs, gen_config, request_id, response_parser=None):
        request = _fit_to_context(model, inputs, gen_config)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        streamer = DirectStreamer(processor.base_tokenizer, loop, queue, response_parser=response_parser)

        def run() -> None:
            try:
                self._generate(model, processor, inputs, gen_config, request_id, request, _WithoutEnd(streamer))
            except _GenerationCancelled:  # the client went away: its slot is free
                loop.call_soon_threadsafe(queue.put_nowait, None)
            except Exception as error:
                loop.call_soon_threadsafe(queue.put_nowait, _StreamError(str(error)))
            else:
                streamer.end()  # after the outcome is recorded, which the last chunk reads

        self.submit(run)
        return queue, streamer

    async def generate_non_streaming(self, model, processor, inputs, gen_config, request_id):
        request = _fit_to_context(model, inputs, gen_config)
        try:
            base_ids = await self.async_submit(
                self._generate, model, processor, inputs, gen_config, request_id, request
            )
        except (ValueError, NotImplementedError) as error:
            raise HTTPException(status_code=400, detail=str(error)) from None
        text = processor.base_tokenizer.decode(base_ids, skip_special_tokens=True)
        return text, self.outcomes[request_id].usage.prompt_tokens, base_ids

    def _generate(self, model, processor, inputs, gen_config, request_id, request, streamer=None) -> list[int]:
        """Generate (on the inference thread), feed what was written to the request's codebook (which
        has read the prompt), record the outcome, return the new base ids."""
        sequences = model.generate(
            **inputs, generation_config=gen_config, tokenizer=processor, streamer=streamer, return_hypertokens=True
        )
        base_ids = request.write(sequences[0, inputs["input_ids"].shape[1] :])
        usage = request.usage()
        finish = "length" if usage.completion_ids >= gen_config.max_new_tokens else "stop"
        self.outcomes[request_id] = _Outcome(usage, finish)
        return base_ids


class _WithoutEnd:
    """A streamer whose ``end`` is left to the caller (so the outcome is recorded first)."""

    def __init__(self, streamer):
        self.streamer = streamer

    def put(self, value) -> None:
        self.streamer.put(value)

    def end(self) -> None:
        pass


class Zip2ZipGenerationState(GenerationState):
    """One `Zip2ZipGenerateManager` per model; no continuous batching (its paged cache has no
    codebooks)."""

    def __init__(self):
        super().__init__(continuous_batching=False)
        self.outcomes: dict[str, _Outcome] = {}

    def get_manager(self, model_id: str, use_cb: bool = False) -> Zip2ZipGenerateManager:
        if model_id not in self._generate_managers:
            self._generate_managers[model_id] = Zip2ZipGenerateManager(self.outcomes)
        return self._generate_managers[model_id]


def _fit_to_context(model, inputs, gen_config: GenerationConfig) -> RequestCodebook:
    """Refuse a prompt or a ``max_tokens`` the model's positions cannot hold (400); a request that
    named no length gets as many steps as fit, at most the default. Returns the request's codebook,
    the prompt read."""
    context = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    request = RequestCodebook(model.codec)
    prompt_base_ids = request.read_prompt(inputs["input_ids"][0])
    # Positions the prompt takes: one per base token, or one per id in "compressed" mode.
    compressed = model.config.position_mode == "compressed"
    prompt_positions = inputs["input_ids"].shape[1] if compressed else len(prompt_base_ids)
    if context is None:
        room = None
    elif prompt_positions >= context:
        raise HTTPException(
            status_code=400,
            detail=f"the prompt takes {prompt_positions} positions and the model has {context}: shorten it",
        )
    else:
        room = context - prompt_positions
    if gen_config.max_new_tokens is None:
        gen_config.max_new_tokens = min(_DEFAULT_MAX_NEW_TOKENS, room or _DEFAULT_MAX_NEW_TOKENS)
    elif room is not None and gen_config.max_new_tokens > room:
        raise HTTPException(
            status_code=400,
            detail=f"max_tokens={gen_config.max_new_tokens} does not fit: the prompt takes {prompt_positions} of the "
            f"model's {context} positions, so at most {room} remain",
        )
    try:
        gen_config.validate()  # the settings generate would refuse; minor ones only warn
    except ValueError as error:
        raise HTTPException(status_code=400, detail=f"bad generation settings: {error}") from None
    return request


class _Zip2ZipHandler:
    """What both OpenAI endpoints add to transformers' handlers (a mixin, first in the bases)."""

    generation_state: Zip2ZipGenerationState

    def _validate_request(self, body: dict) -> None:
        super()._validate_request(body)
        for field, harmless in _REFUSED_FIELDS.items():
            if field in body and body[field] not in harmless:
                raise HTTPException(status_code=400, detail=f"{field}={body[field]!r} is not supported by this server")
        for field in (*_MAX_TOKENS_FIELDS, "prompt_lookup_num_tokens"):
            if body.get(field) is not None:
                _checked_int(field, body[field])
        for field, low, high in (("temperature", 0.0, None), ("top_p", 0.0, 1.0)):
            value = body.get(field)
            if value is not None and not _number_in(value, low, high):
                bounds = f">= {low}" if high is None else f"in ({low}, {high}]"
                raise HTTPException(status_code=400, detail=f"{field} must be a number {bounds}, got {value!r}")

    def _build_generation_config(self, body: dict, model_generation_config, use_cb: bool = False):
        config = super()._build_generation_config(body, model_generation_config, use_cb=use_cb)
        if all(body.get(field) is None for field in _MAX_TOKENS_FIELDS) and body.get("generation_config") is None:
            config.max_new_tokens = None  # as many as fit (`_fit_to_context`)
        if body.get("prompt_lookup_num_tokens") is not None:
            config.prompt_lookup_num_tokens = int(body["prompt_lookup_num_tokens"])
        return config

    async def handle_request(self, body: dict, request_id: str):
        outcomes = self.generation_state.outcomes
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
        """The stream, its last chunk's usage and finish reason rewritten from the outcome."""
        try:
            async for chunk in chunks:
                if '"usage"' in chunk and request_id in self.generation_state.outcomes:
                    chunk = _rewrite_sse(chunk, self.generation_state.outcomes[request_id])
                yield chunk
        finally:
            self.generation_state.outcomes.pop(request_id, None)


def _checked_int(field: str, value) -> int:
    try:
        return setting(field, value, least=1)
    except ValueError as error:
        raise HTTPException(status_code=400, detail=str(error)) from None


def _number_in(value, low: float, high: float | None) -> bool:
    """``low <= value`` (``low < value <= high`` with a high bound), for ints and floats, not bools."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return low <= value if high is None else low < value <= high


def _with_outcome(payload: dict, outcome: _Outcome) -> dict:
    """A response object with usage in base tokens (+ compressed counts) and the finish reason by steps."""
    if "usage" in payload:
        payload["usage"] = outcome.usage.to_openai()
    for choice in payload.get("choices", ()):
        if choice.get("finish_reason") in ("length", "stop"):
            choice["finish_reason"] = outcome.finish_reason
    return payload


def _rewrite_sse(chunk: str, outcome: _Outcome) -> str:
    events = []
    for event in chunk.split("\n\n"):
        if event.startswith("data: {") and '"usage"' in event:
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


class _NotServed:
    """The endpoints of transformers serve that this server does not offer, each a 501 naming the two it does."""

    def __init__(self, endpoint: str):
        self.endpoint = endpoint

    async def handle_request(self, *args, **kwargs):
        raise HTTPException(
            status_code=501,
            detail=f"{self.endpoint} is not served for zip2zip models: use /v1/chat/completions or /v1/completions",
        )


def build_app(checkpoint: str, device: str = "auto", dtype: str = "auto"):
    """The FastAPI app serving ``checkpoint`` (loaded now) under its path as the model name."""
    model_manager = Zip2ZipModelManager(device=device, dtype=dtype, force_model=checkpoint)
    generation_state = Zip2ZipGenerationState()
    return build_server(
        model_manager,
        Zip2ZipChatCompletionHandler(model_manager=model_manager, generation_state=generation_state),
        completion_handler=Zip2ZipCompletionHandler(model_manager=model_manager, generation_state=generation_state),
        response_handler=_NotServed("/v1/responses"),
        transcription_handler=_NotServed("/v1/audio/transcriptions"),
        systemone_handler=_NotServed("/v1/systemone"),
        generation_state=generation_state,
    )


def serve(checkpoint: str, host: str = "127.0.0.1", port: int = 8000, device: str = "auto", dtype: str = "auto"):
    """Serve ``checkpoint`` until interrupted (``python -m zip2zip_hf serve``)."""
    import uvicorn

    uvicorn.run(build_app(checkpoint, device=device, dtype=dtype), host=host, port=port, log_level="warning")
