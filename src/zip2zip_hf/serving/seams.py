"""The serving internals of transformers that ``zip2zip serve`` plugs into, imported once for the
installed release and checked by name on import (`_check_seams`): a release that moved one fails
here, naming itself, rather than deep in a request.

transformers has laid its serving code out two ways (`ENGINE_LAYOUT`): up to 5.24 a
`GenerateManager` runs each model's requests on an inference thread of the server's process; from
5.25 on each model sits behind an `EngineClient` that sends its requests to a `GenerateRunner`.
"""

from __future__ import annotations

import inspect

import transformers


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
ENGINE_LAYOUT = hasattr(_model_manager, "EngineClient")
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

    if ENGINE_LAYOUT:
        from transformers.cli.serving.model_manager import EngineClient, ModelLoader
        from transformers.cli.serving.utils import (
            Detokenizer,
            EngineDeadError,
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


__all__ = [
    "ENGINE_LAYOUT",
    "ChatCompletionHandler",
    "CompletionHandler",
    "GenerationState",
    "HTTPException",
    "JSONResponse",
    "ModelManager",
    "StreamingResponse",
    "TransformersCompletionCreateParamsStreaming",
    "TransformersTextCompletionCreateParams",
    "_GenerationCancelled",
    "_StreamError",
    "build_server",
]
if ENGINE_LAYOUT:
    __all__ += ["Detokenizer", "EngineClient", "EngineDeadError", "GenerateRunner", "ModelLoader"]
    __all__ += ["canonical_model_id", "parse_model_id", "set_torch_seed"]
else:
    __all__ += ["DirectStreamer", "GenerateManager", "split_revision"]


def _check_seams() -> None:
    """The transformers internals this module overrides or calls, by name."""
    handlers = ("handle_request", "_validate_request")
    missing = []
    if ENGINE_LAYOUT:
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
    needed[ChatCompletionHandler] = (*handlers, *building, "render_messages" if ENGINE_LAYOUT else "_resolve_model")
    missing += [
        f"{owner.__name__}.{name}" for owner, names in needed.items() for name in names if not hasattr(owner, name)
    ]
    if missing:
        raise ImportError(
            f"transformers {transformers.__version__} moved the serving internals zip2zip serve plugs into "
            f"({', '.join(missing)}): use a release between 5.24 and the one in setup.cfg"
        )


_check_seams()
