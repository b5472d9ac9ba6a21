"""What ``uptrain`` trains on: the recipe's corpus (the standard library and pydoc, or the broad corpus of
everything installed) cut into windows of base tokens, compressed into training rows, with the record
``uptrain.json`` keeps of them (the corpus, its bytes, every source with its files and bytes)."""

from __future__ import annotations

import platform
import random

from .corpus import build_corpus, training_corpus
from .uptrain_recipe import UptrainRecipe


__all__ = ["training_rows", "training_texts_of"]


def training_rows(tokenizer, recipe: UptrainRecipe) -> tuple[list[dict], dict]:
    """Compressed training rows (``[prefix] + window`` each, compressed from an empty codebook),
    shuffled, and what they hold."""
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    code, prose, record = training_texts_of(recipe)
    windows = {}
    for kind, texts in (("code", code), ("prose", prose)):
        windows[kind] = []
        for ids in tokenizer.base_ids(texts, add_special_tokens=False):
            windows[kind] += [
                ids[i : i + recipe.window] for i in range(0, len(ids) - recipe.window // 4, recipe.window)
            ]
    chosen = windows["code"] + windows["prose"] * recipe.prose_repeats
    random.Random(recipe.seed).shuffle(chosen)
    rows = [{"input_ids": tokenizer.codec.encode([prefix, *w])[0]} for w in chosen]
    about = {
        **record,
        "windows": {kind: len(w) for kind, w in windows.items()},
        "base_tokens": {kind: sum(map(len, w)) for kind, w in windows.items()},
        "rows": len(rows),
    }
    return rows, about


def _text_bytes(texts: list[str]) -> int:
    return sum(len(text.encode("utf-8")) for text in texts)


def training_texts_of(recipe: UptrainRecipe) -> tuple[list[str], list[str], dict]:
    """``(code, prose, record)``: the recipe's training texts, and what ``uptrain.json`` says of them
    (the corpus, its bytes, and every source with its files and bytes)."""
    if recipe.corpus == "broad":
        corpus = build_corpus(recipe.corpus_budgets, seed=recipe.seed)
        code, prose = corpus.split()
        return (
            code,
            prose,
            {
                "corpus": "broad",
                "code": f"{len(code)} files of code and configuration, {_text_bytes(code)} bytes",
                "prose": f"{len(prose)} files of prose (Markdown, documentation), {_text_bytes(prose)} bytes",
                **corpus.record(),
            },
        )
    code, prose = training_corpus(recipe.max_chars)
    return (
        code,
        prose,
        {
            "corpus": "stdlib",
            "code": f"{len(code)} top-level standard-library modules of Python {platform.python_version()}",
            "prose": f"{len(prose)} pydoc language-reference sections",
            "bytes": {"python": _text_bytes(code), "docs": _text_bytes(prose)},
            "sources": [
                {"source": "python-stdlib", "kind": "python", "files": len(code), "bytes": _text_bytes(code)},
                {"source": "python-stdlib:pydoc", "kind": "docs", "files": len(prose), "bytes": _text_bytes(prose)},
            ],
        },
    )
