"""Bits per byte of text: the measure that compares models whose tokens differ.

A zip2zip model and its base model read the same text in different numbers of steps, so loss per
token does not compare them; bits per byte does. `score_texts` scores exactly the same text for
both:

* each text is split into windows of ``window`` *base* tokens (the same spans for every model);
* every window is read after one prefix token (the tokenizer's BOS, else its EOS, as lm-eval does),
  so every base token of the text is predicted once, and the bytes scored are all of the text's
  UTF-8 bytes;
* a zip2zip model reads each window compressed from an empty codebook (the prefix included): its
  score is the probability of the window's canonical ids, the ids its tokenizer writes for that
  text. With ``config.canonical_ids_only`` (the default) that is the probability of the text: the
  logits allow no other id sequence of it. Without (a checkpoint converted from the reference
  package), the model also gives some probability to other legal id sequences of the same text, and
  this is an upper bound on its bits per byte.

``python -m zip2zip_hf eval MODEL_PATH FILE... [--json]`` runs it on saved checkpoints, zip2zip or
plain (detected from the config).

`score_kinds` scores texts of several kinds three ways (`MODES`): the base model; the zip2zip
model; and *base mode*, the zip2zip model's own base causal LM (its LoRA merged or active) reading
the base ids, no hypertokens. zip2zip / base is what the zip2zip model costs; base mode / base is
the part of it that the adapter's change to the base weights costs (drift); the rest is the cost of
reading and writing hypertokens. `kinds_table` prints them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F


__all__ = [
    "DEFAULT_WINDOW",
    "MODES",
    "TextScore",
    "base_mode",
    "best_device",
    "combined_score",
    "kinds_table",
    "load_for_evaluation",
    "score_kinds",
    "score_texts",
]

# Base tokens per scored window, unless the model has fewer positions.
DEFAULT_WINDOW = 1024


@dataclass
class TextScore:
    """The score of some texts, all windows together.

    Attributes:
        bits_per_byte: total negative log-likelihood in bits over the texts' UTF-8 bytes.
        bytes: UTF-8 bytes scored (all of the texts).
        tokens: positions the model predicted (compressed ids for a zip2zip model).
        base_tokens: base tokens of the same text (equal to ``tokens`` for a plain model).
        nats: total negative log-likelihood in nats.
    """

    bits_per_byte: float
    bytes: int
    tokens: int
    base_tokens: int
    nats: float

    @property
    def steps_per_byte(self) -> float:
        """Model steps per byte of text: what compression saves (a plain model: base tokens per byte)."""
        return self.tokens / self.bytes

    def to_dict(self) -> dict:
        return {**asdict(self), "steps_per_byte": self.steps_per_byte}


def best_device() -> torch.device:
    """CUDA, else Apple's MPS, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def load_for_evaluation(path: str, device: torch.device | str | None = None):
    """``(model, tokenizer)`` of a saved checkpoint, zip2zip or plain, in eval mode on ``device``
    (default: `best_device`). The Auto classes pick the kind from the checkpoint's config."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import zip2zip_hf  # noqa: F401  (registers the zip2zip classes with the Auto classes)

    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model.to(device or best_device()).eval(), tokenizer


def score_texts(
    model,
    tokenizer,
    texts: Sequence[str],
    window: int | None = None,
    batch_size: int = 4,
    progress: bool = False,
) -> TextScore:
    """Bits per byte of ``texts`` under ``model`` (see the module docstring for what is scored).

    Args:
        model: a `Zip2ZipForCausalLM` with its `Zip2ZipTokenizer`, or any causal LM with its tokenizer.
        texts: the texts, each split into windows on its own.
        window: base tokens per window (default `DEFAULT_WINDOW`, or as many as the model has
            positions for after the prefix token, if fewer).
        batch_size: windows per forward call.
        progress: show a progress bar over the batches.
    """
    if isinstance(texts, str):
        raise TypeError("score_texts takes a list of texts, not a single string")
    not_text = next((i for i, text in enumerate(texts) if not isinstance(text, str)), None)
    if not_text is not None:
        raise TypeError(f"texts[{not_text}] is a {type(texts[not_text]).__name__}, not a str")
    positions = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    if window is None:
        window = DEFAULT_WINDOW if positions is None else min(DEFAULT_WINDOW, positions - 1)
    for name, value in (("window", window), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int of at least 1, got {value!r}")
    if positions is not None and window + 1 > positions:
        raise ValueError(
            f"window={window} needs {window + 1} positions (a prefix token, then the window) but the "
            f"model has {positions}: use window={positions - 1} or less"
        )
    rows, base_tokens = _windows(tokenizer, texts, window)
    nats, tokens = _score_rows(model, tokenizer, rows, batch_size, progress)
    n_bytes = sum(len(text.encode("utf-8")) for text in texts)
    if n_bytes == 0:
        raise ValueError("the texts are empty: there is nothing to score")
    return TextScore(nats / math.log(2) / n_bytes, n_bytes, tokens, base_tokens, nats)


def _windows(tokenizer, texts: Sequence[str], window: int) -> tuple[list[list[int]], int]:
    """The model's ids of every window (prefix first), and the texts' base-token count."""
    codec = getattr(tokenizer, "codec", None)
    if codec is not None:
        base_rows = tokenizer.base_ids(list(texts), add_special_tokens=False)
    else:
        # Whole texts, not model inputs: no warning about their length.
        base_rows = [tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"] for text in texts]
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if prefix is None:
        raise ValueError("the tokenizer has neither a BOS nor an EOS token to read each window after")
    rows = []
    for base in base_rows:
        for start in range(0, len(base), window):
            ids = [prefix, *base[start : start + window]]
            rows.append(codec.encode(ids)[0] if codec is not None else ids)
    return rows, sum(map(len, base_rows))


@torch.no_grad()
def _score_rows(model, tokenizer, rows: list[list[int]], batch_size: int, progress: bool) -> tuple[float, int]:
    """Total negative log-likelihood (nats) of every id after the first in each row, and how many."""
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))  # similar lengths share a batch
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    nats, tokens = 0.0, 0
    for batch in tqdm(batches, desc="scoring", unit="batch", disable=not progress):
        width = max(len(rows[i]) for i in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for j, i in enumerate(batch):
            ids[j, : len(rows[i])] = torch.tensor(rows[i])
            mask[j, : len(rows[i])] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
        for j, i in enumerate(batch):  # one row at a time: a (T, vocabulary) float copy, not a batch of them
            n = len(rows[i])
            targets = ids[j, 1:n].to(logits.device)
            nats += float(F.cross_entropy(logits[j, : n - 1].float(), targets, reduction="sum"))
            tokens += n - 1
    return nats, tokens


# The three ways `score_kinds` reads each text.
MODES = ("base", "zip2zip", "base_mode")


def base_mode(model):
    """The causal LM inside a zip2zip model as its training left it (LoRA merged, or active in a PEFT
    model), to read base ids: what the adapter did to the base model, without hypertokens."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner.language_model


def score_kinds(
    texts: dict[str, Sequence[str]],
    base,
    base_tokenizer,
    model,
    tokenizer,
    window: int | None = None,
    batch_size: int = 4,
    modes: Sequence[str] = MODES,
) -> dict[str, dict[str, TextScore]]:
    """``{kind: {"base": ..., "zip2zip": ..., "base_mode": ...}}``: the `TextScore` of each kind's
    texts under the base model (``base`` with its ``base_tokenizer``), the zip2zip ``model`` (with its
    ``tokenizer``) and `base_mode` of it (with ``base_tokenizer``), plus ``"all"``, every kind together.
    ``modes`` picks some of them (the others' models may be None): a base model that training changes
    in place (LoRA) is scored before. The models are put in eval mode while they score and put back."""
    unknown = [mode for mode in modes if mode not in MODES]
    if unknown:
        raise ValueError(f"unknown modes {unknown}: the modes are {', '.join(MODES)}")
    readers = {
        "base": lambda: (base, base_tokenizer),
        "zip2zip": lambda: (model, tokenizer),
        "base_mode": lambda: (base_mode(model), base_tokenizer),
    }
    scores = {kind: {} for kind in texts}
    for mode in modes:
        scorer, scorer_tokenizer = readers[mode]()
        was_training = scorer.training
        scorer.eval()
        try:
            for kind, parts in texts.items():
                scores[kind][mode] = score_texts(scorer, scorer_tokenizer, list(parts), window, batch_size)
        finally:
            scorer.train(was_training)
    if scores:
        scores["all"] = {mode: combined_score([scores[kind][mode] for kind in texts]) for mode in modes}
    return scores


def combined_score(parts: Sequence[TextScore]) -> TextScore:
    """The `TextScore` of several scores' texts together."""
    nats, n_bytes = sum(p.nats for p in parts), sum(p.bytes for p in parts)
    tokens, base_tokens = sum(p.tokens for p in parts), sum(p.base_tokens for p in parts)
    return TextScore(nats / math.log(2) / n_bytes, n_bytes, tokens, base_tokens, nats)


KIND_HEADERS = (
    "kind",
    "bytes",
    "base bits/byte",
    "zip2zip bits/byte",
    "base-mode bits/byte",
    "zip2zip/base",
    "base-mode/base",
    "base tokens/byte",
    "zip2zip steps/byte",
    "steps ratio",
)


def kinds_table(scores: dict[str, dict], markdown: bool = False) -> str:
    """The scores of `score_kinds` (`TextScore`s, or their ``to_dict()``), one row a kind: bits per
    byte three ways, the two ratios to the base, and steps per byte (base tokens and zip2zip steps)."""

    def get(score, name):
        return getattr(score, name) if isinstance(score, TextScore) else score[name]

    rows = []
    for kind, by_mode in scores.items():
        b, z, m = (by_mode[mode] for mode in MODES)
        bits = [get(s, "bits_per_byte") for s in (b, z, m)]
        steps = [get(s, "steps_per_byte") for s in (b, z)]
        rows.append(
            [
                kind,
                str(get(b, "bytes")),
                *(f"{x:.4f}" for x in bits),
                f"{bits[1] / bits[0]:.3f}",
                f"{bits[2] / bits[0]:.3f}",
                *(f"{x:.4f}" for x in steps),
                f"{steps[1] / steps[0]:.3f}",
            ]
        )
    if markdown:
        lines = ["| " + " | ".join(KIND_HEADERS) + " |", "|---|" + "---:|" * (len(KIND_HEADERS) - 1)]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])
    widths = [max(len(r[i]) for r in [list(KIND_HEADERS), *rows]) for i in range(len(KIND_HEADERS))]
    return "\n".join(
        "  ".join([r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])])
        for r in [list(KIND_HEADERS), *rows]
    )
