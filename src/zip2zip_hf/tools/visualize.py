"""See the hypertokens: compressed ids as coloured terminal text or HTML, and compression statistics.

Tools around a `Zip2ZipTokenizer`, not part of a checkpoint (they are for people, not for the model).
"""

from __future__ import annotations

import html
from collections.abc import Iterable
from typing import Any

from ..tokenization_zip2zip import Zip2ZipTokenizer


__all__ = [
    "ANSI_BRIGHT_STYLES",
    "ANSI_RESET",
    "ANSI_STYLES",
    "HTML_COLORS",
    "color_decode",
    "compression_stats",
    "to_html",
]

# One colour per merge length: 1 = a base token (plain), 2, 3, and 4 or more base tokens. Two hypertokens
# of the same length in a row alternate with the bright shade of that colour, so the boundary shows.
ANSI_STYLES = {2: "\x1b[30;46m", 3: "\x1b[30;43m", 4: "\x1b[30;45m"}
ANSI_BRIGHT_STYLES = {2: "\x1b[30;106m", 3: "\x1b[30;103m", 4: "\x1b[30;105m"}
ANSI_RESET = "\x1b[0m"
HTML_COLORS = {2: "#aee8ee", 3: "#ffe39a", 4: "#f3b6f0"}

# Base ids kept before a hypertoken when decoding it piecewise: enough context for byte-level and
# metaspace decoders to render the new piece exactly as in the full text.
_DECODE_WINDOW = 8


def _merge_class(length: int) -> int:
    """Colour class of a piece made of ``length`` base tokens: 1, 2, 3 or 4 (meaning 4+)."""
    return min(length, 4)


def _pieces(
    tokenizer: Zip2ZipTokenizer, token_ids: Any, skip_special_tokens: bool
) -> list[tuple[str, int, list[int]]]:
    """Split the text of compressed ids into ``(text, merge class, ids)`` pieces, one per id.

    A piece is decoded after a few base ids of context, so byte-level and metaspace decoders
    render it as in the full text. Ids whose bytes end inside a UTF-8 character are joined with
    the next ones (the piece then takes the longest merge among them).
    """
    ids = token_ids.tolist() if hasattr(token_ids, "tolist") else list(token_ids)
    base = tokenizer.base_tokenizer
    _, codebook = tokenizer.codec.decode(ids)  # validates every id; the final codebook knows them all
    if skip_special_tokens:
        special = set(tokenizer.all_special_ids)
        ids = [i for i in ids if i not in special]
    pieces: list[tuple[str, int, list[int]]] = []
    done: list[int] = []
    pending: list[int] = []
    pending_ids: list[int] = []
    pending_class = 1
    for position, code in enumerate(ids):
        subtokens = list(codebook.get_subtokens(code))
        pending += subtokens
        pending_ids.append(code)
        pending_class = max(pending_class, _merge_class(len(subtokens)))
        window = done[-_DECODE_WINDOW:]
        before = base.decode(window, skip_special_tokens=False)
        after = base.decode(window + pending, skip_special_tokens=False)
        if after.endswith("\ufffd") and position + 1 < len(ids):
            continue
        text = after[len(before) :] if after.startswith(before) else base.decode(pending, skip_special_tokens=False)
        pieces.append((text, pending_class, pending_ids))
        done += pending
        pending, pending_ids, pending_class = [], [], 1
    return pieces


def color_decode(tokenizer: Zip2ZipTokenizer, token_ids: Any, skip_special_tokens: bool = False) -> str:
    """The text of compressed ids with ANSI colours showing the hypertokens.

    Base tokens are plain; hypertokens of 2, 3 and 4+ base tokens each get their own background
    colour (`ANSI_STYLES`; a hypertoken right after one of the same length takes the bright shade,
    `ANSI_BRIGHT_STYLES`). Colours are closed at every line end, so lines can be printed separately.
    """
    out = []
    previous = (1, False)  # (merge class, bright) of the previous piece
    for text, merge, _ in _pieces(tokenizer, token_ids, skip_special_tokens):
        if merge == 1:
            out.append(text)
            previous = (1, False)
            continue
        bright = previous == (merge, False)
        style = (ANSI_BRIGHT_STYLES if bright else ANSI_STYLES)[merge]
        out.append("\n".join(style + line + ANSI_RESET if line else line for line in text.split("\n")))
        previous = (merge, bright)
    return "".join(out)


def to_html(tokenizer: Zip2ZipTokenizer, token_ids: Any, skip_special_tokens: bool = False) -> str:
    """The text of compressed ids as HTML: a ``<pre>`` with one ``<span class="z2z-mN">`` per hypertoken.

    N is the merge length (2, 3, or 4 for 4+); each span has that length's background colour and a
    title naming its hyper id. Base tokens are plain text. All text is HTML-escaped.
    """
    out = ['<pre class="zip2zip">']
    for text, merge, ids in _pieces(tokenizer, token_ids, skip_special_tokens):
        if merge == 1:
            out.append(html.escape(text))
            continue
        title = ", ".join(f"id {i}" for i in ids)
        out.append(
            f'<span class="z2z-m{merge}" style="background:{HTML_COLORS[merge]}" title="{title}">'
            f"{html.escape(text)}</span>"
        )
    out.append("</pre>")
    return "".join(out)


def compression_stats(tokenizer: Zip2ZipTokenizer, texts: str | Iterable[str]) -> dict[str, float]:
    """How much LZW shortens ``texts``, each compressed on its own (no special tokens added).

    Returns a dict with ``texts``, ``bytes`` (UTF-8), ``base_tokens``, ``compressed_tokens`` (totals
    over the texts), ``ratio`` (compressed / base), ``bytes_per_base_token`` and
    ``bytes_per_compressed_token``.
    """
    texts = [texts] if isinstance(texts, str) else list(texts)
    rows = tokenizer.base_ids(texts, add_special_tokens=False)
    base = sum(len(row) for row in rows)
    compressed = sum(len(tokenizer.codec.encode(row)[0]) for row in rows)
    n_bytes = sum(len(text.encode("utf-8")) for text in texts)
    return {
        "texts": len(texts),
        "bytes": n_bytes,
        "base_tokens": base,
        "compressed_tokens": compressed,
        "ratio": compressed / base if base else 1.0,
        "bytes_per_base_token": n_bytes / base if base else 0.0,
        "bytes_per_compressed_token": n_bytes / compressed if compressed else 0.0,
    }
