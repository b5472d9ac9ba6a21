"""zip2zip_hf: adaptive per-sequence vocabularies (LZW hypertokens) for any Hugging Face causal LM.

Importing the package registers its classes with the transformers Auto classes, both in-process
(`AutoConfig.register`, ...) and for remote code (`register_for_auto_class`), so checkpoints saved
here load with or without the package installed.
"""

import logging

from transformers import AutoConfig

from .configuration_zip2zip import Zip2ZipConfig
from .lzw import Codebook, LZWCodec, LZWStream


__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())

AutoConfig.register(Zip2ZipConfig.model_type, Zip2ZipConfig, exist_ok=True)
Zip2ZipConfig.register_for_auto_class()

__all__ = ["Codebook", "LZWCodec", "LZWStream", "Zip2ZipConfig", "__version__"]
