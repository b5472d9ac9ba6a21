"""A zip2zip request checked in vLLM's frontend, where a bad request is still the client's error.

vLLM checks a prompt's ids against the vocabulary (``V + K`` here); a hyper id is legal only where
the prompt's own compression has installed it, and in ``"base"`` position mode a prompt needs one
position per base token. A prompt that breaks either would only fail in the engine, for every
request of its batch. Some sampling settings name or constrain ids by the base tokenizer's
vocabulary, which knows no hypertoken (structured output, bad words, logit bias, allowed ids), or
describe ids as text one by one (logprobs): with per-request hypertokens they would be silently
wrong, so they are refused, as is a LoRA request (its adapter was not trained with the encoders).
`install` adds these checks to vLLM's own, each failure a validation error (a 400 over the OpenAI
server) naming the field.
"""

from __future__ import annotations

from vllm.exceptions import VLLMValidationError
from vllm.renderers.base import BaseRenderer
from vllm.v1.engine.input_processor import InputProcessor

from .vllm_detokenizer import is_zip2zip_tokenizer


__all__ = ["REFUSED_SETTINGS", "check_prompt", "check_settings", "install"]

# Sampling settings that have no zip2zip meaning (see the module's docstring), by field name.
REFUSED_SETTINGS = (
    "logprobs",
    "prompt_logprobs",
    "structured_outputs",
    "bad_words",
    "logit_bias",
    "allowed_token_ids",
)


def check_prompt(tokenizer, config, token_ids, parameter: str | None) -> None:
    """Raise a `VLLMValidationError` naming what is wrong with a zip2zip prompt, if anything."""
    stream = tokenizer.codec.stream()
    try:
        stream.feed(list(token_ids))
    except ValueError as error:
        raise VLLMValidationError(f"prompt: {error}", parameter=parameter or "prompt") from None
    positions = getattr(config.get_text_config(), "max_position_embeddings", None)
    if getattr(config, "position_mode", None) == "base" and positions and stream.num_base_ids >= positions:
        raise VLLMValidationError(
            f"prompt: its {stream.num_base_ids} base tokens take as many positions and the model has {positions}",
            parameter=parameter or "prompt",
        )


def check_settings(params, lora_request) -> None:
    """Raise a `VLLMValidationError` naming the first setting a zip2zip request cannot honour."""
    for field in REFUSED_SETTINGS:
        if getattr(params, field, None):
            raise VLLMValidationError(
                f"{field} is not supported by zip2zip models: it speaks of ids one by one, or of the "
                "base vocabulary, and each request writes hypertokens of its own",
                parameter=field,
            )
    if lora_request is not None:
        raise VLLMValidationError("LoRA requests are not supported by zip2zip models", parameter="lora_request")


def install() -> None:
    """Wrap `BaseRenderer.validate_token_ids` and `InputProcessor.process_inputs` once per process
    (a no-op for every other tokenizer)."""
    validate = BaseRenderer.validate_token_ids
    if getattr(validate, "zip2zip", False):
        return

    def validate_token_ids(self, token_ids, *, parameter=None):
        validate(self, token_ids, parameter=parameter)
        if token_ids and is_zip2zip_tokenizer(self.tokenizer):
            check_prompt(self.tokenizer, self.model_config.hf_config, token_ids, parameter)

    process = InputProcessor.process_inputs

    def process_inputs(self, request_id, prompt, params, *args, lora_request=None, **kwargs):
        if is_zip2zip_tokenizer(self.renderer.tokenizer):
            check_settings(params, lora_request)
        return process(self, request_id, prompt, params, *args, lora_request=lora_request, **kwargs)

    validate_token_ids.zip2zip = True
    BaseRenderer.validate_token_ids = validate_token_ids
    InputProcessor.process_inputs = process_inputs
