"""A zip2zip checkpoint behind the OpenAI API, on transformers' own server.

transformers' serving code is reused whole: its FastAPI app, request parsing, chat templates,
streaming, ``/v1/models`` and ``/health``. Three of its seams are plugged, each a subclass:

* **loading** (`Zip2ZipModelManager`, and `Zip2ZipModelLoader` where transformers has loaders):
  transformers resolves ``config.architectures[0]`` on its own module, where no remote-code model
  lives; here the checkpoint loads as a `Zip2ZipForCausalLM` with its `Zip2ZipTokenizer`;
* **generation**: each request is one `generate` call from an empty codebook (`_run_request`),
  counted by a `RequestCodebook`, one request at a time on a thread of the server's process;
  streamers receive base ids, decoded by the base tokenizer;
* **requests** (`Zip2ZipCompletionHandler`, `Zip2ZipChatCompletionHandler`): bad input is a 4xx
  JSON error before any generation, ``prompt_lookup_num_tokens`` is taken from the request, and
  ``usage`` counts base tokens (what the API means by tokens) with the compressed counts beside.

transformers has laid its serving code out two ways, and the generation seam follows the installed
one (`_ENGINE_LAYOUT`): up to 5.24 a `GenerateManager` runs each model's requests on an inference
thread (`Zip2ZipGenerateManager`); from 5.25 on each model sits behind an `EngineClient` that sends
its requests to a `GenerateRunner` in a process of its own. zip2zip keeps the model in the server's
process there too (`Zip2ZipEngineClient`, `Zip2ZipGenerateRunner`): the engine's connection is a
pair of thread queues, as transformers connects an API server to an engine it did not start, so the
request's codebook and its outcome never cross a process boundary.

The seams are checked on import (`_check_seams`): a transformers release that moved one fails here,
naming itself, rather than deep in a request.
"""

from __future__ import annotations

import asyncio
import contextvars
import copy
import inspect
import json
import queue
import re
import threading
from dataclasses import dataclass

import transformers
from transformers import AutoTokenizer, GenerationConfig, StoppingCriteria, StoppingCriteriaList

from .request_checks import MAX_TOKENS_FIELDS, BadRequest, check_messages, check_request, sampling_requested
from .request_codebook import RequestCodebook, RequestUsage


try:
    from transformers.cli.serving import model_manager as _model_manager
    from transformers.cli.serving import server as _server_module  # noqa: F401  (the layout of 5.24 on)
    from transformers.utils.import_utils import is_serve_available
except ImportError as error:
    raise ImportError(
        f"zip2zip serve runs on transformers' serving code (transformers.cli.serving, from transformers 5.24 "
        f"on); transformers {transformers.__version__} does not have it: {error}"
    ) from None
if not is_serve_available():
    raise ImportError("serving needs FastAPI, uvicorn and openai: pip install 'zip2zip_hf[serve]'")
# 5.25 on: each model behind an `EngineClient`, its requests run by a `GenerateRunner`; up to 5.24: a
# `GenerateManager` per model, in the server's process.
_ENGINE_LAYOUT = hasattr(_model_manager, "EngineClient")
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
    from transformers.cli.serving.utils import GenerationState, _GenerationCancelled, _StreamError

    if _ENGINE_LAYOUT:
        from transformers.cli.serving.model_manager import EngineClient, ModelLoader
        from transformers.cli.serving.utils import (
            Detokenizer,
            GenerateRunner,
            canonical_model_id,
            parse_model_id,
            set_torch_seed,
        )
    else:
        from transformers.cli.serving.utils import DirectStreamer, GenerateManager, split_revision
except ImportError as error:
    raise ImportError(
        f"transformers {transformers.__version__} moved the serving code zip2zip serve plugs into: {error}; "
        "use a release between 5.24 and the one in setup.cfg"
    ) from None


__all__ = ["Zip2ZipChatCompletionHandler", "Zip2ZipCompletionHandler", "Zip2ZipModelManager", "build_app", "serve"]

# The id of the request a handler is answering, for the engine to file its outcome under (5.25 on: the
# engine numbers requests its own way).
_REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("zip2zip_request_id")

# The most new tokens a request gets when it names none (transformers serve's own default).
_DEFAULT_MAX_NEW_TOKENS = 1024


def _check_seams() -> None:
    """The transformers internals this module overrides or calls, by name."""
    handlers = ("handle_request", "_validate_request")
    missing = []
    if _ENGINE_LAYOUT:
        building = ("_build_generation_kwargs", "_check_prompt_length")
        needed = {
            ModelLoader: ("_load_model", "load_processor", "load_config", "load_model_and_processor"),
            ModelManager: ("preload_engine", "shutdown"),
            EngineClient: ("generate_streaming", "generate_non_streaming", "_send_request", "process_running"),
            GenerateRunner: ("cancel", "_process_requests"),
            GenerationState: ("use_continuous_batching",),
        }
        # An engine reached through queues it did not make (transformers' several API servers).
        if "connection" not in inspect.signature(EngineClient.__init__).parameters:
            missing.append("EngineClient(connection=...)")
    else:
        building = ("_build_generation_config",)
        needed = {
            ModelManager: ("_load_model", "_load_processor", "load_model_and_processor"),
            GenerateManager: ("generate_streaming", "generate_non_streaming", "submit", "async_submit"),
            GenerationState: ("get_manager", "use_continuous_batching"),
        }
    needed[CompletionHandler] = handlers + building
    # Where the chat handler holds the tokenizer, before it applies the chat template.
    needed[ChatCompletionHandler] = (*handlers, *building, "render_messages" if _ENGINE_LAYOUT else "_resolve_model")
    missing += [
        f"{owner.__name__}.{name}" for owner, names in needed.items() for name in names if not hasattr(owner, name)
    ]
    if missing:
        raise ImportError(
            f"transformers {transformers.__version__} moved the serving internals zip2zip serve plugs into "
            f"({', '.join(missing)}): use a release between 5.24 and the one in setup.cfg"
        )


_check_seams()


# The models served under a name that is not their folder (`build_app(name=...)`): name -> folder.
_SERVED_FROM: dict[str, str] = {}


def _served_from(repo: str, revision: str | None) -> tuple[str, str | None]:
    """Where the model served as ``repo`` (at ``revision``) is read from."""
    return (_SERVED_FROM[repo], None) if repo in _SERVED_FROM else (repo, revision)


def _load_tokenizer(repo: str, revision: str | None):
    repo, revision = _served_from(repo, revision)
    return AutoTokenizer.from_pretrained(repo, revision=revision)


def _load_zip2zip_model(repo: str, revision: str | None, dtype, device, attn_implementation):
    from ..modeling_zip2zip import Zip2ZipForCausalLM

    repo, revision = _served_from(repo, revision)
    model = Zip2ZipForCausalLM.from_pretrained(
        repo, revision=revision, dtype=dtype, device_map=device, attn_implementation=attn_implementation
    )
    return model.eval()


@dataclass(frozen=True)
class _Outcome:
    """What a finished request reports back to its handler."""

    usage: RequestUsage
    finish_reason: str  # "length" at max_new_tokens ids or the end of the positions, else "stop"


def _run_request(
    model, processor, inputs, gen_config, request: RequestCodebook, streamer=None, stopping_criteria=None
):
    """Generate for one request (on the thread that runs the model), feed what was written to the
    request's codebook (which has read the prompt). Returns the new base ids and the outcome."""
    extra = {} if stopping_criteria is None else {"stopping_criteria": stopping_criteria}
    try:
        sequences = model.generate(
            **inputs,
            generation_config=gen_config,
            tokenizer=processor,
            streamer=streamer,
            return_hypertokens=True,
            **extra,
        )
    except NotImplementedError as error:  # a mode zip2zip refuses: the request's fault
        raise ValueError(str(error)) from None
    base_ids = request.write(sequences[0, inputs["input_ids"].shape[1] :])
    usage = request.usage()
    return base_ids, _Outcome(usage, _finish_reason(model, usage, gen_config, base_ids))


def _finish_reason(model, usage: RequestUsage, gen_config: GenerationConfig, base_ids: list[int]) -> str:
    """``"length"`` when the request wrote its ``max_new_tokens`` ids or came to the end of the model's
    positions (generate stops before an id could need a position past the last: `PositionLimit`),
    else ``"stop"`` (an end-of-sequence id or a stop string)."""
    if usage.completion_ids >= gen_config.max_new_tokens:
        return "length"
    eos = gen_config.eos_token_id
    if base_ids and base_ids[-1] in (eos if isinstance(eos, (list, tuple)) else [eos]):
        return "stop"
    context = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    compressed = model.config.position_mode == "compressed"
    held = usage.prompt_ids + usage.completion_ids if compressed else usage.prompt_tokens + usage.completion_tokens
    per_id = 1 if compressed else model.codec.max_subtokens
    return "length" if context and held + per_id > context else "stop"


class Zip2ZipGenerationState(GenerationState):
    """How the model generates: no continuous batching (its paged cache has no codebooks). Holds the
    finished requests' outcomes, by request id, for their handlers."""

    def __init__(self):
        super().__init__(continuous_batching=False)
        self.outcomes: dict[str, _Outcome] = {}

    def get_manager(self, model_id: str, use_cb: bool = False):
        """One `Zip2ZipGenerateManager` per model (up to 5.24)."""
        if model_id not in self._generate_managers:
            self._generate_managers[model_id] = Zip2ZipGenerateManager(self.outcomes)
        return self._generate_managers[model_id]


def _fit_to_context(config, codec, inputs, gen_config: GenerationConfig) -> RequestCodebook:
    """Refuse a prompt or a ``max_tokens`` the model's positions cannot hold (400); a request that
    named no length gets as many steps as fit, at most the default. Returns the request's codebook,
    the prompt read."""
    context = getattr(config.get_text_config(), "max_position_embeddings", None)
    request = RequestCodebook(codec)
    prompt_base_ids = request.read_prompt(inputs["input_ids"][0])
    # Positions the prompt takes: one per base token, or one per id in "compressed" mode.
    compressed = config.position_mode == "compressed"
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


if not _ENGINE_LAYOUT:  # transformers 5.24: a GenerateManager per model, in the server's process

    class Zip2ZipModelManager(ModelManager):
        """transformers' model manager, loading a zip2zip checkpoint and its tokenizer (no remote
        code needed: the package is here)."""

        def _load_processor(self, model_id_and_revision: str, gguf_file: str | None = None):
            return _load_tokenizer(*split_revision(model_id_and_revision))

        def _load_model(self, model_id_and_revision: str, tqdm_class=None, progress_callback=None, gguf_file=None):
            model_id, revision = split_revision(model_id_and_revision)
            return _load_zip2zip_model(model_id, revision, self.dtype, self.device, self.attn_implementation)

    class Zip2ZipGenerateManager(GenerateManager):
        """One `generate` call per request, on transformers' inference thread, from an empty codebook.

        The request's outcome (usage, finish reason) is left in ``outcomes`` under its request id,
        for its handler to put in the response.
        """

        def __init__(self, outcomes: dict[str, _Outcome]):
            super().__init__()
            self.outcomes = outcomes

        def generate_streaming(self, model, processor, inputs, gen_config, request_id, response_parser=None):
            request = _fit_to_context(model.config, model.codec, inputs, gen_config)
            loop = asyncio.get_running_loop()
            output = asyncio.Queue()
            streamer = DirectStreamer(processor.base_tokenizer, loop, output, response_parser=response_parser)

            def run() -> None:
                try:
                    self._generate(model, processor, inputs, gen_config, request_id, request, _WithoutEnd(streamer))
                except _GenerationCancelled:  # the client went away: its slot is free
                    loop.call_soon_threadsafe(output.put_nowait, None)
                except Exception as error:
                    loop.call_soon_threadsafe(output.put_nowait, _StreamError(str(error)))
                else:
                    streamer.end()  # after the outcome is recorded, which the last chunk reads

            self.submit(run)
            return output, streamer

        async def generate_non_streaming(self, model, processor, inputs, gen_config, request_id):
            request = _fit_to_context(model.config, model.codec, inputs, gen_config)
            try:
                base_ids = await self.async_submit(
                    self._generate, model, processor, inputs, gen_config, request_id, request
                )
            except ValueError as error:
                raise HTTPException(status_code=400, detail=str(error)) from None
            text = processor.base_tokenizer.decode(base_ids, skip_special_tokens=True)
            return text, self.outcomes[request_id].usage.prompt_tokens, base_ids

        def _generate(self, model, processor, inputs, gen_config, request_id, request, streamer=None) -> list[int]:
            """`_run_request`, its outcome recorded; returns the new base ids."""
            base_ids, self.outcomes[request_id] = _run_request(model, processor, inputs, gen_config, request, streamer)
            return base_ids

    class _WithoutEnd:
        """A streamer whose ``end`` is left to the caller (so the outcome is recorded first)."""

        def __init__(self, streamer):
            self.streamer = streamer

        def put(self, value) -> None:
            self.streamer.put(value)

        def end(self) -> None:
            pass

else:  # transformers 5.25 on: each model behind an EngineClient, its requests run by a GenerateRunner

    class Zip2ZipModelLoader(ModelLoader):
        """transformers' model loader, loading a zip2zip checkpoint and its tokenizer (no remote code
        needed: the package is here)."""

        def load_processor(self, model_id: str):
            repo, revision, _ = parse_model_id(model_id)
            return _load_tokenizer(repo, revision)

        def load_config(self, model_id: str):
            repo, _, _ = parse_model_id(model_id)
            return super().load_config(_SERVED_FROM.get(repo, model_id))

        def _load_model(self, model_id: str, tqdm_class=None, progress_callback=None):
            repo, revision, _ = parse_model_id(model_id)
            return _load_zip2zip_model(repo, revision, self.dtype, self.device, self.attn_implementation)

    @dataclass
    class _Request:
        """One request as it crosses from its handler to the runner and back: its codebook (the
        prompt read), its generation config and seed, and its outcome once it finished."""

        codebook: RequestCodebook
        gen_config: GenerationConfig
        seed: int | None = None
        outcome: _Outcome | None = None

    class Zip2ZipGenerateRunner(GenerateRunner):
        """transformers' runner (one request at a time, on its own thread; cancelling; streaming
        tokens to the engine), each request one `_run_request`."""

        def generate_request(self, request_id: int, inputs: dict, request: _Request, stream: bool) -> None:
            cancelled = self.cancelled_request_ids

            class StopIfCancelled(StoppingCriteria):
                """Stops a request that does not stream once it is cancelled (one that streams stops in
                its streamer)."""

                def __call__(self, input_ids, scores, **kwargs):
                    import torch

                    stop = request_id in cancelled
                    return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)

            def generate(model, processor, streamer=None) -> list[int]:
                if request.seed is not None:
                    set_torch_seed(request.seed)
                model_inputs = {name: value.to(model.device) for name, value in inputs.items()}
                criteria = StoppingCriteriaList([StopIfCancelled()]) if streamer is None else None
                base_ids, request.outcome = _run_request(
                    model, processor, model_inputs, request.gen_config, request.codebook, streamer, criteria
                )
                return base_ids

            self.unfinished_request_ids.add(request_id)
            self.queue.put((request_id, generate, (), stream))

    def _serve_engine(runner: Zip2ZipGenerateRunner, requests: queue.Queue, send_results) -> None:
        """The engine's loop (transformers' `EngineClient.run_engine`, without the process): hands each
        request to the runner; ``None`` stops it."""
        while (message := requests.get()) is not None:
            method, request_id, *args = message
            try:
                getattr(runner, method)(request_id, *args)
            except ValueError as error:
                send_results([], [], [(request_id, ValueError(str(error)))])
            except Exception as error:  # fails the request, not the engine
                send_results([], [], [(request_id, RuntimeError(f"{type(error).__name__}: {error}"))])

    class Zip2ZipEngineClient(EngineClient):
        """The model as handlers use it. Its runner is in this process (see the module's docstring);
        each request's prompt is fitted to the model's positions and read into its codebook here,
        before it is sent, and its outcome filed for its handler once it finished."""

        def _prepare(self, inputs: dict, generation_kwargs: dict) -> _Request:
            gen_config = copy.deepcopy(self.generation_config)
            settings = {name: value for name, value in generation_kwargs.items() if name != "seed"}
            unknown = gen_config.update(**settings)
            if unknown:
                raise HTTPException(status_code=400, detail=f"unknown generation settings: {sorted(unknown)}")
            request = _fit_to_context(self.model_config, self.processor.codec, inputs, gen_config)
            return _Request(request, gen_config, generation_kwargs.get("seed"))

        def _file_outcome(self, request: _Request) -> None:
            request_id = _REQUEST_ID.get(None)
            if request_id is not None and request.outcome is not None:
                self.generation_state.outcomes[request_id] = request.outcome

        async def generate_non_streaming(self, inputs: dict, generation_kwargs: dict):
            request = self._prepare(inputs, generation_kwargs)
            base_ids = await self._send_request("generate_request", args=(dict(inputs), request))
            self._file_outcome(request)
            text = self.processor.base_tokenizer.decode(base_ids, skip_special_tokens=True)
            return text, request.outcome.usage.prompt_tokens, base_ids

        def generate_streaming(self, inputs: dict, generation_kwargs: dict, response_parser=None):
            """As transformers' own, the tokens (base ids) decoded by the base tokenizer, and the
            outcome filed before the stream ends (its last chunks read it)."""
            request = self._prepare(inputs, generation_kwargs)
            output = asyncio.Queue()
            streamer = Detokenizer(self.processor.base_tokenizer, output, response_parser=response_parser)

            async def wait_for_the_end() -> None:
                try:
                    await self._send_request("generate_request", args=(dict(inputs), request), streamer=streamer)
                    self._file_outcome(request)
                    streamer.end()
                except asyncio.CancelledError:
                    pass
                except Exception as error:
                    output.put_nowait(_StreamError(str(error)))

            streamer.task = asyncio.create_task(wait_for_the_end())
            return output, streamer

    class Zip2ZipModelManager(ModelManager):
        """transformers' model manager for the one checkpoint served: its engine runs in this
        process, on two threads (the engine's loop and the runner's)."""

        def preload_engine(self, force_model: str, engine_connection=None) -> None:
            model_id = canonical_model_id(force_model)
            requests, results = queue.Queue(), queue.Queue()

            def send_results(ids, tokens, finished) -> None:
                results.put((ids, tokens, finished))

            model, processor = self.loader.load_model_and_processor(model_id)
            runner = Zip2ZipGenerateRunner(model, processor, send_results)
            threading.Thread(
                target=_serve_engine, args=(runner, requests, send_results), name="zip2zip-engine", daemon=True
            ).start()
            self._requests = requests
            self.engines[model_id] = Zip2ZipEngineClient(
                model_id, self.loader, self.generation_state, connection=(requests, results, 0)
            )

        def shutdown(self) -> None:
            super().shutdown()
            requests = getattr(self, "_requests", None)
            if requests is not None:
                requests.put(None)


class _Zip2ZipHandler:
    """What both OpenAI endpoints add to transformers' handlers (a mixin, first in the bases)."""

    generation_state: Zip2ZipGenerationState

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
        if all(body.get(field) is None for field in MAX_TOKENS_FIELDS) and body.get("generation_config") is None:
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
        _REQUEST_ID.set(request_id)  # this request's task only
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


def _with_outcome(payload: dict, outcome: _Outcome) -> dict:
    """A response object with usage in base tokens (+ compressed counts) and the finish reason by steps."""
    if "usage" in payload:
        payload["usage"] = outcome.usage.to_openai()
    for choice in payload.get("choices", ()):
        if choice.get("finish_reason") in ("length", "stop"):
            choice["finish_reason"] = outcome.finish_reason
    return payload


# What the events that end a stream hold (5.25 on the finish reason and the usage come in two).
_ENDING = re.compile(r'"(usage|finish_reason)"\s*:\s*[{"]')


def _rewrite_sse(chunk: str, outcome: _Outcome) -> str:
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


class _NotServed:
    """The endpoints of transformers serve that this server does not offer, each a 501 naming the two it does."""

    def __init__(self, endpoint: str):
        self.endpoint = endpoint

    async def handle_request(self, *args, **kwargs):
        raise HTTPException(
            status_code=501,
            detail=f"{self.endpoint} is not served for zip2zip models: use /v1/chat/completions or /v1/completions",
        )


def build_app(checkpoint: str, device: str = "auto", dtype: str = "auto", name: str | None = None):
    """The FastAPI app serving ``checkpoint`` (loaded now) under ``name`` as the model name (default:
    its path)."""
    if name is not None and name != checkpoint:
        _SERVED_FROM[name] = checkpoint
    served = checkpoint if name is None else name
    generation_state = Zip2ZipGenerationState()
    if _ENGINE_LAYOUT:
        loader = Zip2ZipModelLoader(device=device, dtype=dtype)
        model_manager = Zip2ZipModelManager(loader=loader, generation_state=generation_state, force_model=served)
        state = {}  # build_server takes no generation state from 5.25 on
    else:
        model_manager = Zip2ZipModelManager(device=device, dtype=dtype, force_model=served)
        state = {"generation_state": generation_state}
    return build_server(
        model_manager,
        Zip2ZipChatCompletionHandler(model_manager=model_manager, generation_state=generation_state),
        completion_handler=Zip2ZipCompletionHandler(model_manager=model_manager, generation_state=generation_state),
        response_handler=_NotServed("/v1/responses"),
        transcription_handler=_NotServed("/v1/audio/transcriptions"),
        systemone_handler=_NotServed("/v1/systemone"),
        **state,
    )


def serve(
    checkpoint: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    device: str = "auto",
    dtype: str = "auto",
    name: str | None = None,
):
    """Serve ``checkpoint`` under ``name`` (default: its path) until interrupted (``python -m zip2zip_hf serve``)."""
    import uvicorn

    app = build_app(checkpoint, device=device, dtype=dtype, name=name)
    uvicorn.run(app, host=host, port=port, log_level="warning")
