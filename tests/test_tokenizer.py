"""Zip2ZipTokenizer: exact base ids, compression, padding/truncation, decode, chat, save/load, remote code."""

from __future__ import annotations

import html
import json
import os
import re
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, processors
from transformers import AutoTokenizer, LlamaConfig, PreTrainedTokenizerFast

import zip2zip_hf
from utils import STDLIB, run_without_package, stdlib_text
from zip2zip_hf import Codebook, Zip2ZipConfig, Zip2ZipTokenizer
from zip2zip_hf.tools.visualize import color_decode, compression_stats, to_html


ANSI = re.compile(r"\x1b\[[0-9;]*m")
TAGS = re.compile(r"<[^>]+>")
# Texts that exercise the base tokenizer: code, unicode, emoji (multi-byte, split across byte tokens),
# special tokens written inside the text, repeated runs (every LZW code a "KwKwK" case), whitespace.
TRICKY_TEXTS = [
    "def foo(x):\n    return x + 1\n\ndef foo(y):\n    return y + 1\n",
    "Grüße aus Zürich — naïve café, 東京 and Ελληνικά; ünïcödé ünïcödé",
    "emoji 😀😀😀 🇨🇭 👩‍👩‍👧 and back 😀😀",
    "<|im_start|>user\nhi <|endoftext|> there<|im_end|>\n<|im_start|>assistant\n",
    "=" * 40 + "\n" + "0" * 33 + "\n" + "ab" * 25,
    "   \t\n\n  trailing spaces   ",
    "",
    "a",
]


def rust_copy(base) -> Tokenizer:
    return Tokenizer.from_str(base.backend_tokenizer.to_str())


@pytest.fixture(scope="session")
def tok(tiny_base_tokenizer) -> Zip2ZipTokenizer:
    return Zip2ZipTokenizer.from_base(tiny_base_tokenizer, max_codebook_size=2048, max_subtokens=4)


@pytest.fixture(scope="session")
def eos_pad_tok(tiny_base_tokenizer) -> Zip2ZipTokenizer:
    """A base without a pad token: from_base falls back to EOS as pad."""
    base = PreTrainedTokenizerFast(
        tokenizer_object=rust_copy(tiny_base_tokenizer),
        eos_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    assert base.pad_token is None
    return Zip2ZipTokenizer.from_base(base, max_codebook_size=64, max_subtokens=3)


@pytest.fixture(scope="session")
def affix_base(tiny_base_tokenizer) -> PreTrainedTokenizerFast:
    """A base whose post-processor wraps every text in BOS ... EOS (like Llama/BERT-style tokenizers)."""
    rust = rust_copy(tiny_base_tokenizer)
    rust.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A <|im_end|>",
        pair="<|endoftext|> $A <|im_end|> $B",
        special_tokens=[("<|endoftext|>", 0), ("<|im_end|>", 3)],
    )
    base = PreTrainedTokenizerFast(
        tokenizer_object=rust, bos_token="<|endoftext|>", eos_token="<|im_end|>", pad_token="<pad>"
    )
    assert base("hi")["input_ids"][0] == 0 and base("hi")["input_ids"][-1] == 3
    return base


@pytest.fixture(scope="session")
def affix_tok(affix_base) -> Zip2ZipTokenizer:
    return Zip2ZipTokenizer.from_base(affix_base, max_codebook_size=256, max_subtokens=4)


def unpadded(encoding, row: int) -> list[int]:
    ids, mask = encoding["input_ids"][row], encoding["attention_mask"][row]
    return [int(i) for i, m in zip(ids, mask, strict=True) if m]


# ---------------------------------------------------------------------------------------- construction


def test_from_base_copies_settings(tok, tiny_base_tokenizer):
    base = tiny_base_tokenizer
    assert tok.initial_vocab_size == len(base) == len(tok) == 512
    assert tok.vocab_size == base.vocab_size
    assert tok.get_vocab() == base.get_vocab()
    assert (tok.max_codebook_size, tok.max_subtokens) == (2048, 4)
    assert tok.disabled_ids == sorted(set(base.all_special_ids) | {base.pad_token_id}) == [0, 1, 2, 3]
    assert (tok.codec.initial_vocab_size, tok.codec.max_codebook_size, tok.codec.max_subtokens) == (512, 2048, 4)
    assert tok.codec.disabled_ids == frozenset(tok.disabled_ids)
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == (base.bos_token, base.eos_token, base.pad_token)
    assert tok.pad_token_id == base.pad_token_id
    assert set(tok.all_special_tokens) == set(base.all_special_tokens)
    assert tok.chat_template == base.chat_template
    assert tok.model_max_length == base.model_max_length
    assert tok.padding_side == "left"


def test_from_base_accepts_a_path(tiny_base_tokenizer, tmp_path):
    tiny_base_tokenizer.save_pretrained(tmp_path)
    tok = Zip2ZipTokenizer.from_base(tmp_path, max_codebook_size=100, max_subtokens=2)
    assert (tok.initial_vocab_size, tok.max_codebook_size, tok.max_subtokens) == (512, 100, 2)
    text = TRICKY_TEXTS[0]
    assert tok.base_ids([text])[0] == tiny_base_tokenizer(text)["input_ids"]


def test_pad_falls_back_to_eos(eos_pad_tok):
    assert eos_pad_tok.pad_token == eos_pad_tok.eos_token == "<|endoftext|>"
    assert eos_pad_tok.pad_token_id in eos_pad_tok.disabled_ids


def test_padding_side_init_kwarg(tiny_base_tokenizer):
    tok = Zip2ZipTokenizer.from_base(tiny_base_tokenizer, padding_side="right")
    assert tok.padding_side == "right"
    enc = tok(["a", "hello hello"], padding=True)
    assert enc["attention_mask"][0][0] == 1 and enc["attention_mask"][0][-1] == 0


def test_base_settings_do_not_leak(tiny_base_tokenizer):
    base = PreTrainedTokenizerFast(tokenizer_object=rust_copy(tiny_base_tokenizer), eos_token="<|endoftext|>")
    base.backend_tokenizer.enable_truncation(max_length=3)
    tok = Zip2ZipTokenizer.from_base(base)
    text = "one two three four five six"
    assert tok.codec.decode(tok(text)["input_ids"])[0] == tiny_base_tokenizer(text)["input_ids"]


def test_adding_tokens_is_refused(tiny_base_tokenizer):
    tok = Zip2ZipTokenizer.from_base(tiny_base_tokenizer)
    with pytest.raises(ValueError, match="hypertokens"):
        tok.add_tokens(["<brand_new>"])
    assert len(tok) == 512


def test_config_mismatch_names_the_field(tok):
    text_config = LlamaConfig(
        vocab_size=tok.initial_vocab_size,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    settings_ = dict(
        initial_vocab_size=tok.initial_vocab_size,
        max_subtokens=tok.max_subtokens,
        disabled_ids=tok.disabled_ids,
        pad_token_id=tok.pad_token_id,
    )
    Zip2ZipConfig(text_config=text_config, max_codebook_size=tok.max_codebook_size, **settings_).check_tokenizer(tok)
    bad = Zip2ZipConfig(text_config=text_config, max_codebook_size=tok.max_codebook_size + 1, **settings_)
    with pytest.raises(ValueError, match="max_codebook_size"):
        bad.check_tokenizer(tok)


# ---------------------------------------------------------------------------------------- encoding


@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_base_ids_are_the_base_tokenizers(tok, affix_tok, tiny_base_tokenizer, affix_base, add_special_tokens):
    texts = TRICKY_TEXTS + [stdlib_text(20_000)]
    for z, base in ((tok, tiny_base_tokenizer), (affix_tok, affix_base)):
        for text in texts:
            expected = base(text, add_special_tokens=add_special_tokens)["input_ids"]
            assert z.base_ids([text], add_special_tokens=add_special_tokens)[0] == expected
            compressed = z(text, add_special_tokens=add_special_tokens)["input_ids"]
            assert z.codec.decode(compressed)[0] == expected
            assert compressed == z.codec.encode(expected)[0]


def test_single_text_round_trip_and_compression(tok):
    text = stdlib_text(30_000)
    enc = tok(text)
    assert set(enc) == {"input_ids", "attention_mask"}
    assert enc["attention_mask"] == [1] * len(enc["input_ids"])
    assert max(enc["input_ids"]) >= tok.initial_vocab_size  # hypertokens were created
    assert len(enc["input_ids"]) < 0.9 * len(tok.base_ids([text])[0])
    assert tok.decode(enc["input_ids"]) == text
    assert tok.encode(text) == enc["input_ids"]


def test_batch_left_padding_and_mask_from_padding(eos_pad_tok):
    tok = eos_pad_tok  # pad id == eos id
    eos = tok.eos_token
    texts = [f"short{eos}", f"a much longer text text text {eos} with a real eos inside{eos}"]
    enc = tok(texts, padding=True, return_tensors="pt")
    assert enc["input_ids"].shape == enc["attention_mask"].shape and enc["input_ids"].dtype == torch.long
    singles = [tok(t)["input_ids"] for t in texts]
    n0 = len(singles[0])
    width = enc["input_ids"].shape[1]
    assert enc["attention_mask"][0].tolist() == [0] * (width - n0) + [1] * n0
    assert enc["attention_mask"][1].tolist() == [1] * width
    # The real EOS at the end of row 0 has the pad id and keeps mask 1.
    assert enc["input_ids"][0, -1].item() == tok.pad_token_id and enc["attention_mask"][0, -1].item() == 1
    for row, single in enumerate(singles):
        assert unpadded(enc, row) == single
    assert tok.batch_decode(enc["input_ids"], skip_special_tokens=True) == [t.replace(eos, "") for t in texts]
    assert tok.decode(enc["input_ids"][1]) == texts[1]


def test_per_call_padding_side(tok):
    enc = tok(["a", "hello hello hello"], padding=True, padding_side="right")
    assert enc["attention_mask"][0][0] == 1 and enc["attention_mask"][0][-1] == 0
    assert enc["input_ids"][0][-1] == tok.pad_token_id


def test_padding_to_max_length_and_multiple(tok):
    enc = tok(["a b", "c"], padding="max_length", max_length=10)
    assert [len(r) for r in enc["input_ids"]] == [10, 10]
    enc = tok(["a b c d e"], padding=True, pad_to_multiple_of=8)
    assert len(enc["input_ids"][0]) % 8 == 0


def test_return_options(tok, affix_tok):
    text = "x = x + x + x + x"
    enc = tok(text, return_attention_mask=False, return_length=True, return_special_tokens_mask=True)
    assert "attention_mask" not in enc
    assert enc["length"] == len(enc["input_ids"])
    assert enc["special_tokens_mask"] == [0] * len(enc["input_ids"])
    enc = affix_tok(text, return_special_tokens_mask=True, return_tensors="np")
    assert enc["input_ids"].shape == (1, enc["special_tokens_mask"].shape[1])
    assert enc["special_tokens_mask"][0].tolist()[0] == 1 and enc["special_tokens_mask"][0].tolist()[-1] == 1
    with_specials = affix_tok(text)["input_ids"]
    without = affix_tok(text, add_special_tokens=False)["input_ids"]
    assert with_specials == [0] + without + [3]


def test_unsupported_inputs_are_refused(tok):
    with pytest.raises(NotImplementedError):
        tok("a", "b")
    with pytest.raises(NotImplementedError):
        tok(["a", "b"], is_split_into_words=True)
    with pytest.raises(NotImplementedError):
        tok("a b c", max_length=2, truncation=True, return_overflowing_tokens=True)


def test_prepare_for_model_compresses_base_ids(tok):
    text = "abc abc abc abc"
    base = tok.base_ids([text])[0]
    assert tok.prepare_for_model(base)["input_ids"] == tok(text)["input_ids"]


def test_right_truncation_keeps_the_first_codes(tok):
    text = stdlib_text(5000)
    full = tok(text)["input_ids"]
    for max_length in (1, 7, 100, len(full) - 1, len(full), len(full) + 5):
        ids = tok(text, truncation=True, max_length=max_length)["input_ids"]
        assert ids == full[:max_length]
        assert len(ids) <= max_length


def test_left_truncation_compresses_a_base_suffix(tiny_base_tokenizer):
    tok = Zip2ZipTokenizer.from_base(tiny_base_tokenizer, truncation_side="left")
    text = stdlib_text(5000)
    base = tok.base_ids([text])[0]
    for max_length in (1, 7, 100, 900):
        ids = tok(text, truncation=True, max_length=max_length)["input_ids"]
        assert len(ids) <= max_length
        kept = tok.codec.decode(ids)[0]
        cut = len(base) - len(kept)
        assert kept == base[cut:]
        assert ids == tok.codec.encode(kept)[0]
        assert len(tok.codec.encode(base[cut - 1 :])[0]) > max_length  # one more base token would not fit
    assert tok(text, truncation=True, max_length=10_000)["input_ids"] == tok(text)["input_ids"]


def test_truncation_keeps_post_processor_specials(affix_base):
    for side in ("left", "right"):
        tok = Zip2ZipTokenizer.from_base(affix_base, truncation_side=side)
        ids = tok(stdlib_text(3000), truncation=True, max_length=20)["input_ids"]
        assert len(ids) == 20 and ids[0] == 0 and ids[-1] == 3
        with pytest.raises(ValueError, match="special tokens"):
            tok("hello world", truncation=True, max_length=1)


# ---------------------------------------------------------------------------------------- decoding


def test_decode_options(tok):
    text = "hello , world . <|endoftext|> hello hello"
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text
    assert tok.decode(torch.tensor(ids)) == text
    assert tok.decode(ids, skip_special_tokens=True) == "hello , world .  hello hello"
    assert tok.decode(ids, clean_up_tokenization_spaces=True) == "hello, world. <|endoftext|> hello hello"
    assert tok.decode(ids[0]) == "h"
    assert tok.decode([ids, ids[:3]]) == [text, tok.decode(ids[:3])]
    text_again, codebook = tok.decode_with_codebook(ids)
    assert text_again == text and isinstance(codebook, Codebook)
    assert codebook == tok.codec.encode(tok.base_ids([text])[0])[1]
    with pytest.raises(TypeError, match="decode_with_codebook"):
        tok.decode(ids, return_codebook=True)


def test_decode_rejects_illegal_ids(tok):
    ids = tok("abc abc abc abc abc")["input_ids"]
    first_hyper = next(i for i, code in enumerate(ids) if code >= tok.initial_vocab_size)
    with pytest.raises(ValueError, match="not installed"):
        tok.decode(ids[first_hyper:])  # a tail slice: its hypertokens were created before it
    with pytest.raises(ValueError, match="outside the id space"):
        tok.decode([5, tok.initial_vocab_size + tok.max_codebook_size])
    with pytest.raises(ValueError):
        tok.decode([-1])


def test_tokenize_and_token_conversion_are_the_bases(tok, tiny_base_tokenizer):
    text = TRICKY_TEXTS[3]
    assert tok.tokenize(text) == tiny_base_tokenizer.tokenize(text)
    base = tiny_base_tokenizer(text)["input_ids"]
    assert tok.convert_ids_to_tokens(base) == tiny_base_tokenizer.convert_ids_to_tokens(base)
    assert tok.convert_tokens_to_ids(tok.tokenize(text)) == base


# ---------------------------------------------------------------------------------------- chat template


def test_chat_template_gives_compressed_ids(tok):
    messages = [
        {"role": "system", "content": "You are a helpful helper. Helpful, helpful, helpful."},
        {"role": "user", "content": "Say hello hello hello hello."},
    ]
    rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):  # transformers 5 returns a BatchEncoding by default
        ids = ids["input_ids"]
    assert ids == tok(rendered, add_special_tokens=False)["input_ids"]
    assert max(ids) >= tok.initial_vocab_size
    assert tok.decode(ids) == rendered
    out = tok.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    assert out["input_ids"].tolist() == [ids] and out["attention_mask"].tolist() == [[1] * len(ids)]


# ---------------------------------------------------------------------------------------- inspection


def test_color_decode_and_html(tok):
    text = "<tag> & " + "abcd " * 30 + "\n" + "😀 x😀 " * 5 + "\nend"
    ids = tok(text)["input_ids"]
    coloured = color_decode(tok, ids)
    assert ANSI.sub("", coloured) == text
    lengths = {len(tok.codec.decode(ids)[1].get_subtokens(i)) for i in ids}
    assert {2, 3, 4} <= lengths
    for style in ("\x1b[30;46m", "\x1b[30;43m", "\x1b[30;45m", "\x1b[30;105m"):
        assert style in coloured  # one colour per merge length; a repeat of the same length is bright
    for line in coloured.split("\n"):  # colours never run across a line end
        assert line.count("\x1b[0m") == len(re.findall(r"\x1b\[30;(?:4|10)\dm", line))
    page = to_html(tok, ids)
    assert page.startswith('<pre class="zip2zip">') and "&lt;tag&gt; &amp;" in page
    assert {'class="z2z-m2"', 'class="z2z-m3"', 'class="z2z-m4"'} <= set(re.findall(r'class="z2z-m\d"', page))
    assert html.unescape(TAGS.sub("", page)) == text
    assert ANSI.sub("", color_decode(tok, ids, skip_special_tokens=True)) == text


def test_compression_stats(tok):
    texts = [stdlib_text(4000), "short text", "😀 unicode ünï"]
    stats = compression_stats(tok, texts)
    base = sum(len(tok.base_ids([t], add_special_tokens=False)[0]) for t in texts)
    compressed = sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    assert stats == {
        "texts": 3,
        "bytes": n_bytes,
        "base_tokens": base,
        "compressed_tokens": compressed,
        "ratio": compressed / base,
        "bytes_per_base_token": n_bytes / base,
        "bytes_per_compressed_token": n_bytes / compressed,
    }
    assert compression_stats(tok, texts[0])["base_tokens"] == len(tok.base_ids([texts[0]])[0])
    assert compression_stats(tok, [""])["ratio"] == 1.0


# ---------------------------------------------------------------------------------------- save / load


def saved_config(path: Path) -> dict:
    return json.loads((path / "tokenizer_config.json").read_text())


def test_save_load_round_trip(affix_base, tmp_path):
    tok = Zip2ZipTokenizer.from_base(affix_base, max_codebook_size=300, max_subtokens=3)
    # Changed after construction: must still be saved.
    tok.padding_side, tok.truncation_side, tok.model_max_length = "right", "left", 77
    tok.chat_template = "{{ messages[0]['content'] }}"
    tok.save_pretrained(tmp_path)
    files = set(os.listdir(tmp_path))
    assert {"base_tokenizer.json", "tokenizer_config.json", "tokenization_zip2zip.py", "lzw.py"} <= files
    assert "tokenizer.json" not in files
    config = saved_config(tmp_path)
    assert config["auto_map"]["AutoTokenizer"][0] == "tokenization_zip2zip.Zip2ZipTokenizer"
    assert (config["initial_vocab_size"], config["max_codebook_size"], config["max_subtokens"]) == (512, 300, 3)

    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert type(loaded) is Zip2ZipTokenizer
    for attr in (
        "initial_vocab_size",
        "max_codebook_size",
        "max_subtokens",
        "disabled_ids",
        "padding_side",
        "truncation_side",
        "chat_template",
        "model_max_length",
        "bos_token",
        "eos_token",
        "pad_token",
        "all_special_tokens",
        "all_special_ids",
        "clean_up_tokenization_spaces",
    ):
        assert getattr(loaded, attr) == getattr(tok, attr), attr
    assert loaded.get_vocab() == tok.get_vocab() and len(loaded) == len(tok)
    # The v5 trap: a reloaded tokenizer must still encode exactly like the base tokenizer.
    for text in TRICKY_TEXTS + [stdlib_text(10_000)]:
        assert loaded.base_ids([text])[0] == affix_base(text)["input_ids"]
        assert loaded(text)["input_ids"] == tok(text)["input_ids"]
    # Saving what was loaded changes nothing.
    again = tmp_path / "again"
    loaded.save_pretrained(again)
    assert saved_config(again) == config
    assert (again / "base_tokenizer.json").read_text() == (tmp_path / "base_tokenizer.json").read_text()


def test_settings_can_be_overridden_at_load(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    loaded = Zip2ZipTokenizer.from_pretrained(tmp_path, max_codebook_size=10, padding_side="right")
    assert (loaded.max_codebook_size, loaded.codec.max_codebook_size, loaded.padding_side) == (10, 10, "right")


REMOTE_CHILD = r"""
import json, sys
from transformers import AutoTokenizer

folder, texts = sys.argv[1], json.loads(sys.argv[2])
tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
batch = tok(texts, padding=True)
print(json.dumps({
    "class": f"{type(tok).__module__}.{type(tok).__name__}",
    "ids": [tok(t)["input_ids"] for t in texts],
    "batch": batch["input_ids"], "mask": batch["attention_mask"],
    "decoded": [tok.decode(tok(t)["input_ids"]) for t in texts],
    "settings": [tok.initial_vocab_size, tok.max_codebook_size, tok.max_subtokens, tok.disabled_ids, tok.padding_side],
    "zip2zip_hf_loaded": any(m.split(".")[0] == "zip2zip_hf" and sys.modules[m] is not None for m in sys.modules),
}))
"""


@pytest.mark.slow
def test_remote_code_load_without_the_package(affix_base, tmp_path):
    tok = Zip2ZipTokenizer.from_base(affix_base, max_codebook_size=128, max_subtokens=3, padding_side="right")
    tok.save_pretrained(tmp_path)
    texts = TRICKY_TEXTS[:5] + [stdlib_text(3000)]
    out = json.loads(run_without_package(REMOTE_CHILD, str(tmp_path), json.dumps(texts)))
    assert out["class"].startswith("transformers_modules.") and out["class"].endswith(".Zip2ZipTokenizer")
    assert not out["zip2zip_hf_loaded"]
    assert out["settings"] == [512, 128, 3, tok.disabled_ids, "right"]
    assert out["ids"] == [tok(t)["input_ids"] for t in texts]
    batch = tok(texts, padding=True)
    assert (out["batch"], out["mask"]) == (batch["input_ids"], batch["attention_mask"])
    assert out["decoded"] == [tok.decode(ids) for ids in out["ids"]]
    assert out["decoded"] == [f"<|endoftext|>{t}<|im_end|>" for t in texts]  # BOS/EOS from the post-processor


# ---------------------------------------------------------------------------------------- properties

# Pieces rather than characters, so special tokens, emoji and runs appear often enough to matter.
TEXT = st.lists(
    st.one_of(
        st.sampled_from(["a", "b", "ab", " ", "=", "\n", "\t", "<|endoftext|>", "<|im_end|>", "😀", "é", "東"]),
        st.characters(blacklist_categories=("Cs",)),
    ),
    max_size=80,
).map("".join)
PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@PROPERTY
@given(text=TEXT)
def test_property_round_trip(tok, tiny_base_tokenizer, text):
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == tiny_base_tokenizer.decode(tiny_base_tokenizer(text)["input_ids"])
    assert tok.codec.decode(ids)[0] == tiny_base_tokenizer(text)["input_ids"]
    assert len(ids) <= len(tiny_base_tokenizer(text)["input_ids"])


@PROPERTY
@given(texts=st.lists(TEXT, min_size=1, max_size=5), side=st.sampled_from(["left", "right"]))
def test_property_batch_equals_single_rows(tok, texts, side):
    batch = tok(texts, padding=True, padding_side=side)
    width = max(len(tok(t)["input_ids"]) for t in texts)
    for row, text in enumerate(texts):
        single = tok(text)["input_ids"]
        assert len(batch["input_ids"][row]) == width
        assert unpadded(batch, row) == single
        pads = width - len(single)
        padding = batch["input_ids"][row][:pads] if side == "left" else batch["input_ids"][row][len(single) :]
        assert padding == [tok.pad_token_id] * pads


@PROPERTY
@given(text=TEXT, max_length=st.integers(min_value=2, max_value=40), side=st.sampled_from(["left", "right"]))
def test_property_truncation(affix_base, text, max_length, side):
    tok = truncating_tokenizers(affix_base)[side]
    base = affix_base(text, add_special_tokens=False)["input_ids"]
    ids = tok(text, truncation=True, max_length=max_length)["input_ids"]
    assert len(ids) <= max_length
    assert ids[0] == 0 and ids[-1] == 3  # the post-processor's BOS/EOS survive truncation
    kept = tok.codec.decode(ids[1:-1])[0]
    if side == "left":
        assert kept == base[len(base) - len(kept) :]
    else:
        assert kept == base[: len(kept)]
    if len(tok(text)["input_ids"]) <= max_length:
        assert ids == tok(text)["input_ids"]


_TRUNCATING: dict = {}


def truncating_tokenizers(affix_base) -> dict[str, Zip2ZipTokenizer]:
    if not _TRUNCATING:
        for side in ("left", "right"):
            _TRUNCATING[side] = Zip2ZipTokenizer.from_base(
                affix_base, max_codebook_size=32, max_subtokens=3, truncation_side=side
            )
    return _TRUNCATING


# ---------------------------------------------------------------------------------------- the real SmolLM2 tokenizer


@pytest.fixture(scope="module")
def smol_base():
    from zip2zip_hf.tools.smollm2 import smollm2_path

    return AutoTokenizer.from_pretrained(smollm2_path(weights=False))


@pytest.fixture(scope="module")
def smol(smol_base) -> Zip2ZipTokenizer:
    return Zip2ZipTokenizer.from_base(smol_base)


STDLIB_FILES = ["argparse.py", "textwrap.py", "json/encoder.py", "csv.py", "string.py", "difflib.py"]


@pytest.mark.real_model
def test_real_settings(smol, smol_base):
    assert smol.initial_vocab_size == len(smol_base) == len(smol) == 49152
    assert smol.disabled_ids == sorted(set(smol_base.added_tokens_decoder) | {smol_base.pad_token_id})
    assert smol.pad_token == smol.eos_token == "<|im_end|>"


@pytest.mark.real_model
def test_real_base_ids_and_round_trip(smol, smol_base):
    texts = [(STDLIB / name).read_text(encoding="utf-8") for name in STDLIB_FILES] + TRICKY_TEXTS
    for text in texts:
        for add_special_tokens in (True, False):
            expected = smol_base(text, add_special_tokens=add_special_tokens)["input_ids"]
            assert smol.base_ids([text], add_special_tokens)[0] == expected
        ids = smol(text)["input_ids"]
        assert smol.codec.decode(ids)[0] == smol_base(text)["input_ids"]
        assert smol.decode(ids) == smol_base.decode(smol_base(text)["input_ids"]) == text


@pytest.mark.real_model
def test_real_compression_on_code(smol):
    texts = [(STDLIB / name).read_text(encoding="utf-8") for name in STDLIB_FILES]
    stats = compression_stats(smol, texts)
    assert 0.3 < stats["ratio"] < 0.9
    assert stats["bytes_per_compressed_token"] > stats["bytes_per_base_token"]
    for text in texts:
        assert compression_stats(smol, text)["ratio"] < 0.9


@pytest.mark.real_model
def test_real_chat_and_eos_padding(smol):
    messages = [{"role": "user", "content": "Write def f(x): return x\ndef g(x): return x\ndef h(x): return x"}]
    rendered = smol.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    out = smol.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    ids = out["input_ids"][0].tolist()
    assert smol.decode(ids) == rendered and max(ids) >= smol.initial_vocab_size
    batch = smol([rendered, "hi"], padding=True, return_tensors="pt")
    assert batch["attention_mask"][0].all()  # <|im_end|> (= pad) inside the chat keeps mask 1
    assert smol.decode(batch["input_ids"][0]) == rendered


@pytest.mark.real_model
def test_real_save_load_keeps_base_encoding(smol, smol_base, tmp_path):
    smol.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert type(loaded) is Zip2ZipTokenizer
    for name in STDLIB_FILES[:3]:
        text = (STDLIB / name).read_text(encoding="utf-8")
        assert loaded.base_ids([text])[0] == smol_base(text)["input_ids"]
        assert loaded(text)["input_ids"] == smol(text)["input_ids"]
    assert loaded.chat_template == smol_base.chat_template


def test_package_exports_the_tokenizer():
    assert zip2zip_hf.Zip2ZipTokenizer is Zip2ZipTokenizer and "Zip2ZipTokenizer" in zip2zip_hf.__all__


@pytest.mark.parametrize("layout", ["v5", "v4"])
def test_saved_special_tokens_load_in_either_transformers_major(tok, tmp_path, layout):
    """transformers 5 saves the extra special tokens as a list under `extra_special_tokens`, 4.x as
    `additional_special_tokens`; a folder written by either major loads in the running one."""
    tok.save_pretrained(tmp_path)
    path = tmp_path / "tokenizer_config.json"
    config = json.loads(path.read_text())
    extra = config.pop("extra_special_tokens", None) or config.pop("additional_special_tokens")
    config["extra_special_tokens" if layout == "v5" else "additional_special_tokens"] = extra
    path.write_text(json.dumps(config))
    loaded = Zip2ZipTokenizer.from_pretrained(tmp_path)
    assert loaded.all_special_tokens == tok.all_special_tokens
    text = "<|im_start|>user\nhi<|im_end|>"
    assert loaded(text)["input_ids"] == tok(text)["input_ids"]
