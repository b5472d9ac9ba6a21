"""A zip2zip checkpoint behind the OpenAI API, on transformers' own server.

transformers' serving code is reused whole: its FastAPI app, request parsing, chat templates,
streaming, ``/v1/models`` and ``/health``. Three of its seams are plugged, each a subclass:

* **loading** (`Zip2ZipModelManager`, and `Zip2ZipModelLoader` where transformers has loaders):
  transformers resolves ``config.architectures[0]`` on its own module, where no remote-code model
  lives; here the checkpoint loads as a `Zip2ZipForCausalLM` with its `Zip2ZipTokenizer`;
* **generation** (here): each request is one `generate` call from an empty codebook
  (`_run_request`), counted by a `RequestCodebook`, one request at a time on a thread of the
  server's process; streamers receive base ids, decoded by the base tokenizer;
* **requests** (`handlers`): bad input is a 4xx JSON error before any generation, and ``usage``
  counts base tokens (what the API means by tokens) with the compressed counts beside.

The generation seam follows the installed release's layout (`seams.ENGINE_LAYOUT`): up to 5.24 a
`GenerateManager` runs each model's requests on an inference thread (`Zip2ZipGenerateManager`);
from 5.25 on each model sits behind an `EngineClient` that sends its requests to a `GenerateRunner`
in a process of its own. zip2zip keeps the model in the server's process there too
(`Zip2ZipEngineClient`, `Zip2ZipGenerateRunner`): the engine's connection is a pair of thread
queues, as transformers connects an API server to an engine it did not start, so the request's
codebook and its outcome never cross a process boundary.
"""

from __future__ import annotations

import asyncio
import copy
import queue
import threading
from dataclasses import dataclass

from transformers import AutoTokenizer, GenerationConfig, StoppingCriteria, StoppingCriteriaList

from . import seams
from .handlers import (
    REQUEST_ID,
    NotServed,
    RequestOutcome,
    Zip2ZipChatCompletionHandler,
    Zip2ZipCompletionHandler,
)
from .request_codebook import RequestCodebook, RequestUsage
from .routes import replace_management_routes
from .seams import (
    ENGINE_LAYOUT,
    GenerationState,
    HTTPException,
    ModelManager,
    _GenerationCancelled,
    _StreamError,
    build_server,
)


__all__ = ["Zip2ZipChatCompletionHandler", "Zip2ZipCompletionHandler", "Zip2ZipModelManager", "build_app", "serve"]

# The most new tokens a request gets when it names none (transformers serve's own default).
_DEFAULT_MAX_NEW_TOKENS = 1024


class _Loading:
    """How the served checkpoint loads (a mixin of the class that loads it): as a `Zip2ZipForCausalLM`
    with its `Zip2ZipTokenizer`, from the folder of the name it is served under (``folders``, name ->
    folder, for a model served under a name that is not its folder: `build_app(name=...)`)."""

    def __init__(self, *args, folders: dict[str, str] | None = None, **kwargs):
        self.folders = dict(folders or {})  # before transformers' __init__, which may load the model
        super().__init__(*args, **kwargs)

    def _source(self, repo: str, revision: str | None) -> tuple[str, str | None]:
        return (self.folders[repo], None) if repo in self.folders else (repo, revision)

    def _zip2zip_tokenizer(self, repo: str, revision: str | None):
        repo, revision = self._source(repo, revision)
        return AutoTokenizer.from_pretrained(repo, revision=revision)

    def _zip2zip_model(self, repo: str, revision: str | None):
        from ..modeling_zip2zip import Zip2ZipForCausalLM

        repo, revision = self._source(repo, revision)
        model = Zip2ZipForCausalLM.from_pretrained(
            repo,
            revision=revision,
            dtype=self.dtype,
            device_map=self.device,
            attn_implementation=self.attn_implementation,
        )
        return model.eval()


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
    return base_ids, RequestOutcome(usage, _finish_reason(model, usage, gen_config, base_ids))


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
        self.outcomes: dict[str, RequestOutcome] = {}

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


if not ENGINE_LAYOUT:  # transformers 5.24: a GenerateManager per model, in the server's process

    class Zip2ZipModelManager(_Loading, ModelManager):
        """transformers' model manager, loading a zip2zip checkpoint and its tokenizer (no remote
        code needed: the package is here)."""

        def _load_processor(self, model_id_and_revision: str, gguf_file: str | None = None):
            return self._zip2zip_tokenizer(*seams.split_revision(model_id_and_revision))

        def _load_model(self, model_id_and_revision: str, tqdm_class=None, progress_callback=None, gguf_file=None):
            return self._zip2zip_model(*seams.split_revision(model_id_and_revision))

    class Zip2ZipGenerateManager(seams.GenerateManager):
        """One `generate` call per request, on transformers' inference thread, from an empty codebook.

        The request's outcome (usage, finish reason) is left in ``outcomes`` under its request id,
        for its handler to put in the response.
        """

        def __init__(self, outcomes: dict[str, RequestOutcome]):
            super().__init__()
            self.outcomes = outcomes

        def generate_streaming(self, model, processor, inputs, gen_config, request_id, response_parser=None):
            request = _fit_to_context(model.config, model.codec, inputs, gen_config)
            loop = asyncio.get_running_loop()
            output = asyncio.Queue()
            streamer = seams.DirectStreamer(processor.base_tokenizer, loop, output, response_parser=response_parser)

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

    class Zip2ZipModelLoader(_Loading, seams.ModelLoader):
        """transformers' model loader, loading a zip2zip checkpoint and its tokenizer (no remote code
        needed: the package is here)."""

        def load_processor(self, model_id: str):
            repo, revision, _ = seams.parse_model_id(model_id)
            return self._zip2zip_tokenizer(repo, revision)

        def load_config(self, model_id: str):
            repo, _, _ = seams.parse_model_id(model_id)
            return super().load_config(self.folders.get(repo, model_id))

        def _load_model(self, model_id: str, tqdm_class=None, progress_callback=None):
            repo, revision, _ = seams.parse_model_id(model_id)
            return self._zip2zip_model(repo, revision)

    @dataclass
    class _Request:
        """One request as it crosses from its handler to the runner and back: its codebook (the
        prompt read), its generation config and seed, and its outcome once it finished."""

        codebook: RequestCodebook
        gen_config: GenerationConfig
        seed: int | None = None
        outcome: RequestOutcome | None = None

    class Zip2ZipGenerateRunner(seams.GenerateRunner):
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
                    seams.set_torch_seed(request.seed)
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

    class Zip2ZipEngineClient(seams.EngineClient):
        """The model as handlers use it. Its runner is in this process (see the module's docstring);
        each request's prompt is fitted to the model's positions and read into its codebook here,
        before it is sent, and its outcome filed for its handler once it finished."""

        engine_alive = staticmethod(lambda: True)  # set by the manager that starts the engine's loop

        async def _send_request(self, method: str, args: tuple, streamer=None):
            """transformers' own, refused with a 503 once the engine's loop ended (it would wait for ever)."""
            if not self.engine_alive():
                raise seams.EngineDeadError(f"the engine of {self.model_id} stopped: restart the server")
            return await super()._send_request(method, args, streamer)

        def _prepare(self, inputs: dict, generation_kwargs: dict) -> _Request:
            gen_config = copy.deepcopy(self.generation_config)
            settings = {name: value for name, value in generation_kwargs.items() if name != "seed"}
            unknown = gen_config.update(**settings)
            if unknown:
                raise HTTPException(status_code=400, detail=f"unknown generation settings: {sorted(unknown)}")
            request = _fit_to_context(self.model_config, self.processor.codec, inputs, gen_config)
            return _Request(request, gen_config, generation_kwargs.get("seed"))

        def _file_outcome(self, request: _Request) -> None:
            request_id = REQUEST_ID.get(None)
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
            streamer = seams.Detokenizer(self.processor.base_tokenizer, output, response_parser=response_parser)

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
            model_id = seams.canonical_model_id(force_model)
            requests, results = queue.Queue(), queue.Queue()

            def send_results(ids, tokens, finished) -> None:
                results.put((ids, tokens, finished))

            model, processor = self.loader.load_model_and_processor(model_id)
            runner = Zip2ZipGenerateRunner(model, processor, send_results)
            self._engine = threading.Thread(
                target=_serve_engine, args=(runner, requests, send_results), name="zip2zip-engine", daemon=True
            )
            self._engine.start()
            self._requests, self._stopped = requests, False
            connection = (requests, results, 0)
            engine = Zip2ZipEngineClient(model_id, self.loader, self.generation_state, connection=connection)
            engine.engine_alive = self.engine_alive
            self.engines[model_id] = engine

        def engine_alive(self) -> bool:
            """Whether the engine's loop still takes requests (it ends with `shutdown`, or if it crashed)."""
            engine = getattr(self, "_engine", None)
            return engine is not None and engine.is_alive() and not self._stopped

        @property
        def is_dead(self) -> bool:
            """What ``/health`` reads: a 503 once the engine cannot serve."""
            return super().is_dead or not self.engine_alive()

        def shutdown(self) -> None:
            super().shutdown()
            requests = getattr(self, "_requests", None)
            if requests is not None:
                self._stopped = True  # before the loop ends: no request is sent to it from now on
                requests.put(None)


def build_app(checkpoint: str, device: str = "auto", dtype: str = "auto", name: str | None = None):
    """The FastAPI app serving ``checkpoint`` (loaded now) under ``name`` as the model name (default:
    its path)."""
    served = checkpoint if name is None else name
    folders = {served: checkpoint} if served != checkpoint else {}
    generation_state = Zip2ZipGenerationState()
    if ENGINE_LAYOUT:
        loader = Zip2ZipModelLoader(device=device, dtype=dtype, folders=folders)
        model_manager = Zip2ZipModelManager(loader=loader, generation_state=generation_state, force_model=served)
        state = {}  # build_server takes no generation state from 5.25 on
    else:
        model_manager = Zip2ZipModelManager(device=device, dtype=dtype, force_model=served, folders=folders)
        state = {"generation_state": generation_state}
    app = build_server(
        model_manager,
        Zip2ZipChatCompletionHandler(model_manager=model_manager, generation_state=generation_state),
        completion_handler=Zip2ZipCompletionHandler(model_manager=model_manager, generation_state=generation_state),
        response_handler=NotServed("/v1/responses"),
        transcription_handler=NotServed("/v1/audio/transcriptions"),
        systemone_handler=NotServed("/v1/systemone"),
        **state,
    )
    replace_management_routes(app, model_manager)
    app.state.model_manager = model_manager  # for whoever embeds the app: its `shutdown`, its `is_dead`
    return app


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
