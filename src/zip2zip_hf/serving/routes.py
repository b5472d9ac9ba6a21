"""The management routes of transformers serve, as a server of one model loaded at start answers them.

transformers' app (`build_server`) also offers ``/reset``, which stops every model's engine (here the
one model, for good: later requests would wait for ever), and ``/load_model``, which loads any model
by name. Neither needs a preflight, so any web page can send them (a CORS "simple request"). Here
``/reset`` is a 501 that changes nothing, and ``/load_model`` says whether the served model is ready
(what ``transformers chat`` asks before chatting) and refuses any other model with a 400.
"""

from __future__ import annotations

import json

from .seams import HTTPException, StreamingResponse


__all__ = ["replace_management_routes"]

# Routes of transformers' app that are replaced here, by path.
_REPLACED = ("/reset", "/load_model")


def replace_management_routes(app, model_manager) -> None:
    """Replace ``/reset`` and ``/load_model`` of ``app`` (transformers' `build_server`) for a server
    whose ``model_manager`` serves one model for as long as it runs."""
    app.router.routes = [route for route in app.router.routes if getattr(route, "path", None) not in _REPLACED]

    @app.post("/reset")
    def reset():
        raise HTTPException(
            status_code=501,
            detail="/reset is not served: this server serves one model for as long as it runs "
            "(stop the process to free it)",
        )

    @app.post("/load_model")
    async def load_model(body: dict):
        model = body.get("model")
        if model is None:
            raise HTTPException(status_code=422, detail="Missing `model` field in the request body.")
        if not isinstance(model, str):
            raise HTTPException(status_code=400, detail=f"model must be a string, got {type(model).__name__}")
        model_id = _served_model_id(model_manager, model)
        if getattr(model_manager, "is_dead", False):
            raise HTTPException(status_code=503, detail=f"the engine of {model} cannot serve any more")

        async def ready():
            yield f"data: {json.dumps({'status': 'ready', 'model': model_id, 'cached': True})}\n\n"

        return StreamingResponse(ready(), media_type="text/event-stream")


def _served_model_id(model_manager, model: str) -> str:
    """The id of ``model`` when it is the one served, else a 400 naming both."""
    if hasattr(model_manager, "get_engine"):  # 5.25 on: its own check, a ValueError (400) for another model
        return model_manager.get_engine(model).model_id
    served = model_manager.force_model
    if model.split("@")[0] != served.split("@")[0]:
        raise HTTPException(status_code=400, detail=f"this server serves {served!r} only; requested {model!r}")
    return model
