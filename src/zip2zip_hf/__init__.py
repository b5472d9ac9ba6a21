"""zip2zip_hf: adaptive per-sequence vocabularies (LZW hypertokens) for any Hugging Face causal LM.

Importing the package registers its classes with the transformers Auto classes, both in-process
(`AutoConfig.register`, ...) and for remote code (`register_for_auto_class`), so checkpoints saved
here load with or without the package installed; and, where lm-evaluation-harness is installed, its
``zip2zip`` model (`zip2zip_hf.evaluation.lm_eval_harness`).
"""

import importlib.util
import warnings

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

from .cache_zip2zip import Zip2ZipCache, Zip2ZipStaticCache
from .configuration_zip2zip import Zip2ZipConfig
from .lzw import LZWCodec, LZWStream
from .lzw_codebook import Codebook
from .modeling_zip2zip import Zip2ZipForCausalLM, Zip2ZipModel
from .precomputed_codebooks import codebook_tensors
from .tokenization_zip2zip import Zip2ZipTokenizer


__version__ = "0.1.0"

AutoConfig.register(Zip2ZipConfig.model_type, Zip2ZipConfig, exist_ok=True)
Zip2ZipConfig.register_for_auto_class()
# `slow_tokenizer_class=` is the keyword both majors accept (5.x prefers `tokenizer_class=`, 4.57 lacks it).
AutoTokenizer.register(Zip2ZipConfig, slow_tokenizer_class=Zip2ZipTokenizer, exist_ok=True)
Zip2ZipTokenizer.register_for_auto_class("AutoTokenizer")
AutoModelForCausalLM.register(Zip2ZipConfig, Zip2ZipForCausalLM, exist_ok=True)
Zip2ZipForCausalLM.register_for_auto_class("AutoModelForCausalLM")
AutoModel.register(Zip2ZipConfig, Zip2ZipModel, exist_ok=True)
Zip2ZipModel.register_for_auto_class("AutoModel")


def _register_with_lm_eval() -> None:
    """Make ``model="zip2zip"`` known to lm-eval without importing it (lm-eval loads the class on first use).

    An lm-eval whose registry this does not know (before 0.4.13) gets a warning, not a failed import.
    """
    try:
        # lm-eval fills its registry with its own models only while the registry is empty: do that first.
        import lm_eval.models  # noqa: F401
        from lm_eval.api.registry import model_registry
    except ImportError as error:
        warnings.warn(
            f"lm-eval is installed but its model registry is not importable ({error}): "
            "its 'zip2zip' model is not registered; zip2zip_hf[eval] needs lm-eval>=0.4.13",
            stacklevel=2,
        )
        return
    if "zip2zip" not in model_registry:
        model_registry.register("zip2zip", target="zip2zip_hf.evaluation.lm_eval_harness:Zip2ZipLM")


if importlib.util.find_spec("lm_eval") is not None:
    _register_with_lm_eval()

__all__ = [
    "Codebook",
    "LZWCodec",
    "LZWStream",
    "Zip2ZipCache",
    "Zip2ZipStaticCache",
    "Zip2ZipConfig",
    "Zip2ZipForCausalLM",
    "Zip2ZipModel",
    "Zip2ZipTokenizer",
    "__version__",
    "codebook_tensors",
]
