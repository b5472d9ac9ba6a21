"""What a request to the server may ask for, checked before anything is tokenized or generated.

transformers' handlers check only which fields a request names; the values go straight into the
tokenizer and `generate`, where a wrong one is a 500 from deep inside (``int("x")`` for a seed, a
chat template iterating an integer). Here each field the handlers read is checked for its type and
range, and a failure is a `BadRequest` naming the field (a 400 for the client). No FastAPI needed:
the server maps `BadRequest` to its HTTP error.
"""

from __future__ import annotations

import json
import math

from ..lzw_codebook import setting


__all__ = ["MAX_TOKENS_FIELDS", "BadRequest", "check_messages", "check_request", "sampling_requested"]


class BadRequest(ValueError):
    """A request the server cannot honour; the message names the field and says what was wrong."""


# Request fields that would change the answer and are not supported, with the values that change nothing.
REFUSED_FIELDS = {
    "logprobs": (None, False, 0),
    "top_logprobs": (None, 0),
    "n": (None, 1),
    "best_of": (None, 1),
    "echo": (None, False),
    "presence_penalty": (None, 0),
    "logit_bias": (None, {}),  # would bias base ids where the model writes hypertokens too
    "response_format": (None, {"type": "text"}),
    "prediction": (None,),
}
# What each handler reads the completion's length from (steps, as `max_new_tokens` in `generate`).
MAX_TOKENS_FIELDS = ("max_tokens", "max_completion_tokens")
# The seeds `torch.manual_seed` takes.
_SEEDS = (-(2**63), 2**64 - 1)
# The temperatures that sample (0 is greedy): the float32 logits are divided by it, which past these
# bounds overflows (3.5e38 is infinite in float32, 1e-45 is nearly 0) and makes the probabilities NaN.
_SAMPLING_TEMPERATURES = (1e-6, 1e6)
# Settings a request's ``generation_config`` may carry that are checked here (as the fields of the
# request itself): ints with their least value, numbers with their range.
_GENERATION_INTS = {
    "max_new_tokens": 1,
    "min_new_tokens": 0,
    "max_length": 1,
    "min_length": 0,
    "num_beams": 1,
    "top_k": 0,
    "no_repeat_ngram_size": 0,
    "prompt_lookup_num_tokens": 1,
}


def check_request(body: dict) -> None:
    """Raise `BadRequest` for the first field of ``body`` (either endpoint) the server cannot honour."""
    _check_text(body, "")
    for field, harmless in REFUSED_FIELDS.items():
        if field in body and body[field] not in harmless:
            raise BadRequest(f"{field}={body[field]!r} is not supported by this server")
    for field in (*MAX_TOKENS_FIELDS, "prompt_lookup_num_tokens"):
        if body.get(field) is not None:
            _int_setting(field, body[field], least=1)
    if body.get("seed") is not None:
        _int_setting("seed", body["seed"], *_SEEDS)
    _check_temperature("temperature", body.get("temperature"))
    _check_number("top_p", body.get("top_p"), low=0.0, high=1.0, low_open=True)
    # transformers reads it as repetition_penalty = 1 + frequency_penalty, which must stay positive.
    _check_number("frequency_penalty", body.get("frequency_penalty"), low=-1.0, high=2.0, low_open=True)
    _check_stop("stop", body.get("stop"))
    if body.get("generation_config") is not None:
        _check_generation_config(body["generation_config"])


def check_messages(messages) -> None:
    """Raise `BadRequest` unless ``messages`` is a non-empty list of chat messages with text content:
    ``{"role": str, "content": str | [{"type": "text", "text": str}, ...]}`` (content may be absent
    beside ``tool_calls``)."""
    if not isinstance(messages, list) or not messages:
        raise BadRequest(f"messages must be a non-empty list of {{role, content}} objects, got {messages!r}"[:200])
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise BadRequest(f"{where} must be an object with role and content, got {message!r}"[:200])
        if not isinstance(message.get("role"), str) or not message["role"]:
            raise BadRequest(f"{where}.role must be a non-empty string, got {message.get('role')!r}")
        _check_content(where, message.get("content"), tool_calls=message.get("tool_calls"))


def sampling_requested(body: dict) -> bool | None:
    """Whether the request samples: a temperature above 0 does and 0 does not (as the OpenAI API); a
    ``top_p`` alone does, as it means nothing otherwise. ``None``: the checkpoint's generation config
    decides."""
    if body.get("temperature") is not None:
        return body["temperature"] > 0
    if body.get("top_p") is not None:
        return True
    return None


def _int_setting(field: str, value, least: int | None = None, most: int | None = None) -> int:
    try:
        return setting(field, value, least=least, most=most)
    except ValueError as error:
        raise BadRequest(str(error)) from None


def _check_number(field: str, value, low: float, high: float | None = None, low_open: bool = False) -> None:
    """A finite int or float (not a bool) in ``[low, high]`` (``(low, high]`` when ``low_open``), or None."""
    if value is None:
        return
    number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    above = number and (value > low if low_open else value >= low)
    if not (above and (high is None or value <= high)):
        bounds = f"{'(' if low_open else '['}{low}, {'inf)' if high is None else f'{high}]'}"
        raise BadRequest(f"{field} must be a finite number in {bounds}, got {value!r}")


def _check_temperature(field: str, value) -> None:
    """0 (greedy), or a temperature float32 arithmetic can sample with (`_SAMPLING_TEMPERATURES`), or None."""
    _check_number(field, value, low=0.0)
    low, high = _SAMPLING_TEMPERATURES
    if value and not low <= value <= high:
        raise BadRequest(f"{field} must be 0 (greedy) or in [{low:g}, {high:g}] to sample, got {value!r}")


def _check_stop(field: str, stop) -> None:
    """A string or a list of strings, none empty, or None."""
    if stop is None:
        return
    strings = [stop] if isinstance(stop, str) else stop
    if not isinstance(strings, list) or not all(isinstance(text, str) and text for text in strings):
        raise BadRequest(f"{field} must be a non-empty string or a list of them, got {stop!r}"[:200])


def _check_generation_config(text) -> None:
    """``generation_config``: a string holding a JSON object of `GenerationConfig` settings."""
    from transformers import GenerationConfig

    if not isinstance(text, str):
        raise BadRequest(f"generation_config must be a string holding a JSON object, got {type(text).__name__}")
    try:
        requested = json.loads(text)
    except ValueError as error:
        raise BadRequest(f"generation_config is not valid JSON: {error}") from None
    if not isinstance(requested, dict):
        raise BadRequest(f"generation_config must hold a JSON object, got {type(requested).__name__}")
    if "trust_remote_code" in requested:
        raise BadRequest("generation_config cannot set trust_remote_code")
    defaults = GenerationConfig()
    unknown = sorted(name for name in requested if not hasattr(defaults, name))
    if unknown:
        raise BadRequest(f"generation_config has settings GenerationConfig does not know: {unknown}")
    for name, least in _GENERATION_INTS.items():
        if requested.get(name) is not None:
            _int_setting(f"generation_config.{name}", requested[name], least=least)
    _check_temperature("generation_config.temperature", requested.get("temperature"))
    _check_number("generation_config.top_p", requested.get("top_p"), low=0.0, high=1.0, low_open=True)
    _check_number("generation_config.repetition_penalty", requested.get("repetition_penalty"), 0.0, low_open=True)
    _check_stop("generation_config.stop_strings", requested.get("stop_strings"))
    if requested.get("num_return_sequences", 1) != 1:
        raise BadRequest("generation_config.num_return_sequences must be 1: a request gets one answer")
    try:
        GenerationConfig(**requested).validate()
    except (TypeError, ValueError) as error:
        raise BadRequest(f"generation_config: {error}") from None


def _check_content(where: str, content, tool_calls) -> None:
    if content is None and tool_calls:
        return
    if isinstance(content, str):
        return
    if not isinstance(content, list):
        raise BadRequest(f"{where}.content must be a string or a list of text parts, got {content!r}"[:200])
    for index, part in enumerate(content):
        if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
            raise BadRequest(
                f"{where}.content[{index}] must be a text part ({{'type': 'text', 'text': str}}): the model reads "
                f"text only, got {part!r}"[:300]
            )


def _check_text(value, where: str) -> None:
    """Every string in the request encodes as UTF-8 (JSON lets a client send a lone surrogate, which no
    tokenizer can read)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as error:
            raise BadRequest(
                f"{where or 'the request'} is not valid UTF-8 text: a lone surrogate at character {error.start}"
            ) from None
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_text(item, f"{where}.{key}" if where else str(key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_text(item, f"{where}[{index}]")
