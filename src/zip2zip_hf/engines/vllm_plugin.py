"""The vLLM plugin (entry point ``zip2zip`` in ``vllm.general_plugins``): vLLM runs it in its
frontend, its engine core and each worker, before it reads a model's config.

It registers what a zip2zip checkpoint needs there, without a flag on the user's side: the config
and tokenizer classes (``import zip2zip_hf``), the model class under the checkpoint's architecture
name, the vocabulary of V + K ids the sampler works over, the runner's adapter (`vllm_runner`, Model
Runner V1, which a zip2zip checkpoint asks for), the per-request detokenizer (`vllm_detokenizer`)
and the frontend's checks of a request (`vllm_requests`). Each step is idempotent: the plugin may
run more than once in a process, and changes nothing for other models.
"""

from __future__ import annotations

import os


__all__ = ["ARCHITECTURE", "register"]

ARCHITECTURE = "Zip2ZipForCausalLM"


def register() -> None:
    """Register zip2zip with vLLM (see the module's docstring)."""
    import zip2zip_hf  # noqa: F401  (registers Zip2ZipConfig and Zip2ZipTokenizer with the Auto classes)
    from vllm import ModelRegistry
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP, VerifyAndUpdateConfig
    from vllm.transformers_utils.model_arch_config_convertor import (
        MODEL_ARCH_CONFIG_CONVERTORS,
        ModelArchConfigConvertorBase,
    )

    from . import vllm_detokenizer, vllm_requests, vllm_runner

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, "zip2zip_hf.engines.vllm_model:Zip2ZipVllmForCausalLM")

    class Zip2ZipArchConfigConvertor(ModelArchConfigConvertorBase):
        """The base model's architecture, with the vocabulary the logits span: V + K ids."""

        def get_vocab_size(self) -> int:
            return self.hf_config.initial_vocab_size + self.hf_config.max_codebook_size

    class Zip2ZipRunnerChoice(VerifyAndUpdateConfig):
        """A zip2zip checkpoint runs on Model Runner V1 (the adapter that gives its slots their
        requests), unless the user asked for a runner: the workers this process starts inherit it."""

        @staticmethod
        def verify_and_update_config(vllm_config) -> None:
            os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")

    MODEL_ARCH_CONFIG_CONVERTORS.setdefault("zip2zip", Zip2ZipArchConfigConvertor)
    MODELS_CONFIG_MAP.setdefault(ARCHITECTURE, Zip2ZipRunnerChoice)
    vllm_runner.install()
    vllm_detokenizer.install()
    vllm_requests.install()
