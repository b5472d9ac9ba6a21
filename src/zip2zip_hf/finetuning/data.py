"""Training data for zip2zip: texts -> rows of LZW-compressed ids, and a collator for the Trainer.

* `compress_dataset` maps a `datasets.Dataset` of texts to rows of compressed ``input_ids`` with
  ``datasets.map`` (batched, deterministic and picklable, so fingerprint caching and ``num_proc``
  work). A long document is cut in *base* space into consecutive windows, each as long as fits in
  ``max_length`` compressed ids, and each window is compressed from an empty codebook: a row's ids
  are exactly ``codec.encode(window_base_ids)``, the codebook inference builds for that text.
  Compressed ids are never sliced (a slice would refer to entries created before it).
* `Zip2ZipDataCollator` pads rows (left or right) with the pad id; ``attention_mask`` comes from the
  row lengths and ``labels`` are the ids with ``-100`` exactly on the padding, so a real EOS that
  shares the pad id is still trained.

Not part of a checkpoint's remote-code closure; needs ``datasets`` (``pip install zip2zip_hf[train]``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from ..lzw import LZWCodec
from ..lzw_codebook import as_id_list, setting
from ..precomputed_codebooks import codebook_tensors
from .distillation import alignment_tensors


__all__ = ["Zip2ZipCompressor", "Zip2ZipDataCollator", "compress_dataset", "dataset_stats", "split_windows"]


def split_windows(codec: LZWCodec, base_ids: Sequence[int], max_length: int) -> list[tuple[list[int], int]]:
    """Cut ``base_ids`` into consecutive windows whose compressed length is at most ``max_length``.

    Returns ``[(codes, n_base), ...]``: the codes of each window (``codec.encode`` of its base ids)
    and how many base ids it covers. Every window but the last is the longest that fits: the first
    ``max_length`` codes of greedy LZW on the remaining text are themselves the greedy encoding of the
    base ids they cover, and one more base id would need one more code.
    """
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    ids = list(base_ids)
    M = codec.max_subtokens
    windows = []
    start = 0
    while start < len(ids):
        # No window covers more than max_length * M base ids: encode only that much.
        codes, codebook = codec.encode(ids[start : start + max_length * M])
        if len(codes) > max_length:
            codes = codes[:max_length]
        n_base = sum(len(codebook.get_subtokens(c)) for c in codes)
        windows.append((codes, n_base))
        start += n_base
    return windows


class Zip2ZipCompressor:
    """The ``datasets.map`` function of `compress_dataset`: a batch of texts -> rows of compressed ids.

    Holds only plain, sorted data (the base tokenizer as its JSON string and the codec settings), so
    pickling it -- and so the ``datasets`` fingerprint -- is the same in every process and run. The
    Rust tokenizer and the codec are rebuilt lazily in each worker.

    Output columns: ``input_ids`` (compressed), ``num_base_tokens`` (base ids the row stands for).
    """

    def __init__(
        self,
        tokenizer,
        max_length: int,
        text_column: str = "text",
        add_special_tokens: bool = True,
        add_eos: bool = True,
        min_length: int = 2,
    ):
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2 (a row needs an input and a target), got {max_length}")
        if add_eos and tokenizer.eos_token_id is None:
            raise ValueError("add_eos=True but the tokenizer has no eos token")
        self.base_tokenizer_json = tokenizer.base_tokenizer.to_str()
        self.initial_vocab_size = int(tokenizer.initial_vocab_size)
        self.max_codebook_size = int(tokenizer.max_codebook_size)
        self.max_subtokens = int(tokenizer.max_subtokens)
        self.disabled_ids = sorted(int(i) for i in tokenizer.disabled_ids)
        prefix, suffix = tokenizer.special_affixes if add_special_tokens else ([], [])
        self.prefix_ids = [int(i) for i in prefix]
        self.suffix_ids = [int(i) for i in suffix]
        # EOS marks the end of a document (once, even if the post-processor already adds it).
        self.eos_id = int(tokenizer.eos_token_id) if add_eos else None
        self.max_length = int(max_length)
        self.text_column = text_column
        self.min_length = int(min_length)
        self._runtime = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_runtime"] = None  # the Rust tokenizer and the codec are rebuilt where needed
        return state

    def _tools(self):
        if self._runtime is None:
            from tokenizers import Tokenizer

            base = Tokenizer.from_str(self.base_tokenizer_json)
            base.no_truncation()
            base.no_padding()
            codec = LZWCodec(self.initial_vocab_size, self.max_codebook_size, self.max_subtokens, self.disabled_ids)
            self._runtime = (base, codec)
        return self._runtime

    def document_base_ids(self, texts: Sequence[str], indices: Sequence[int] | None = None) -> list[list[int]]:
        """The base ids of whole documents, the post-processor's specials and the final EOS included.

        A value that is not a string (None, a number, a list) is refused, naming its row (``indices``:
        the rows' dataset indices), never turned into text.
        """
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                row = indices[i] if indices is not None else i
                raise ValueError(
                    f"row {row}: {self.text_column!r} must be a string, got {type(text).__name__} {text!r:.40}"
                )
        base, _ = self._tools()
        rows = []
        for encoding in base.encode_batch(list(texts), add_special_tokens=False):
            row = self.prefix_ids + list(encoding.ids) + self.suffix_ids
            if self.eos_id is not None and (not row or row[-1] != self.eos_id):
                row.append(self.eos_id)
            rows.append(row)
        return rows

    def __call__(self, batch: dict[str, list], indices: Sequence[int] | None = None) -> dict[str, list]:
        _, codec = self._tools()
        input_ids, num_base = [], []
        for row in self.document_base_ids(batch[self.text_column], indices):
            for codes, n_base in split_windows(codec, row, self.max_length):
                if len(codes) >= self.min_length:
                    input_ids.append(codes)
                    num_base.append(n_base)
        return {"input_ids": input_ids, "num_base_tokens": num_base}


def compress_dataset(
    dataset,
    tokenizer,
    max_length: int = 1024,
    text_column: str = "text",
    add_special_tokens: bool = True,
    add_eos: bool = True,
    min_length: int = 2,
    num_proc: int | None = None,
    batch_size: int = 64,
    desc: str | None = "zip2zip: compress",
    **map_kwargs,
):
    """Turn a `datasets.Dataset` (or ``DatasetDict``) of texts into rows of compressed ids.

    Each document becomes one or more rows: its base ids (the tokenizer's post-processor specials
    added with ``add_special_tokens``, an EOS appended with ``add_eos``) are cut into consecutive
    windows, each the longest whose compressed length fits ``max_length``, and each window is
    compressed on its own from an empty codebook. Rows shorter than ``min_length`` ids are dropped.

    Args:
        dataset: a ``datasets.Dataset`` / ``DatasetDict`` with a string column ``text_column``.
        tokenizer: the `Zip2ZipTokenizer`.
        max_length: the most compressed ids in a row.
        num_proc, batch_size, desc: passed to ``datasets.map`` (``desc`` is the progress bar's label).
        map_kwargs: more ``datasets.map`` arguments (``load_from_cache_file``, ``cache_file_name``, ...).

    Returns:
        The mapped dataset with columns ``input_ids`` (compressed ids) and ``num_base_tokens`` (base
        ids each row stands for; the Trainer drops it, `dataset_stats` reads it). Every other column
        is removed. Deterministic: the same inputs give the same fingerprint, so results are cached.
    """
    function = Zip2ZipCompressor(
        tokenizer,
        max_length,
        text_column=text_column,
        add_special_tokens=add_special_tokens,
        add_eos=add_eos,
        min_length=min_length,
    )
    splits = dataset.values() if hasattr(dataset, "keys") and not hasattr(dataset, "column_names") else [dataset]
    for split in splits:
        if text_column not in split.column_names:
            raise ValueError(f"the dataset has no column {text_column!r} (columns: {split.column_names})")
    columns = dataset.column_names
    remove = sorted({c for cols in columns.values() for c in cols}) if isinstance(columns, dict) else columns
    return dataset.map(
        function,
        batched=True,
        with_indices=True,  # errors name the dataset's row
        batch_size=batch_size,
        num_proc=num_proc,
        remove_columns=remove,
        desc=desc,
        **map_kwargs,
    )


def dataset_stats(dataset, initial_vocab_size: int) -> dict[str, float]:
    """Totals over a `compress_dataset` result: rows, ids, base ids, hypertokens and their ratios.

    ``compression_ratio`` is compressed ids / base ids (lower is better); ``hypertoken_share`` the
    fraction of ids that are hypertokens.
    """
    tokens = hyper = base = 0
    for start in range(0, len(dataset), 1024):
        chunk = dataset[start : start + 1024]
        for ids in chunk["input_ids"]:
            tokens += len(ids)
            hyper += sum(1 for i in ids if i >= initial_vocab_size)
        base += sum(chunk["num_base_tokens"]) if "num_base_tokens" in chunk else 0
    return {
        "rows": len(dataset),
        "tokens": tokens,
        "base_tokens": base,
        "hypertokens": hyper,
        "compression_ratio": tokens / base if base else float("nan"),
        "hypertoken_share": hyper / tokens if tokens else 0.0,
    }


class Zip2ZipDataCollator:
    """Pad rows of compressed ids into a batch for `Zip2ZipForCausalLM` and the Trainer.

    * ``input_ids`` padded with the tokenizer's pad id on ``padding_side`` (default: the tokenizer's);
    * ``attention_mask`` 1 on each row's own ids, 0 on the padding (from the lengths, never from the id);
    * ``labels`` the ids with ``-100`` exactly on the padding (the model shifts them itself), so a real
      EOS equal to the pad id is still a target.

    * ``codebooks`` (unless ``precompute_codebooks=False``): the rows' codebooks as tensors
      (`codebook_tensors`), so the model's forward runs no Python over the ids. Computed here, in
      the DataLoader's workers when it has some (``dataloader_num_workers``), while the device runs
      the previous step.

    Features are dicts with ``input_ids`` (a list or tensor); other keys are ignored.
    `zip2zip_hf.finetuning.training.CompressionLoggingCallback` logs how much the batches compress.

    Args:
        tokenizer: the `Zip2ZipTokenizer` (for the pad id and V).
        padding_side: ``"left"`` or ``"right"``; default ``tokenizer.padding_side``.
        pad_to_multiple_of: round the batch width up to a multiple of this.
        max_length: raise if a row is longer (rows must be cut in base space, see `compress_dataset`).
        precompute_codebooks: add ``codebooks`` to each batch (a ValueError names an id that is not
            legal where it stands).
        distillation: also add ``distillation``, what `zip2zip_hf.finetuning.distillation` needs to align the
            teacher's base tokens with the rows (`alignment_tensors`); needs ``precompute_codebooks``.
    """

    def __init__(
        self,
        tokenizer,
        padding_side: str | None = None,
        pad_to_multiple_of: int | None = None,
        max_length: int | None = None,
        precompute_codebooks: bool = True,
        distillation: bool = False,
    ):
        if distillation and not precompute_codebooks:
            raise ValueError("distillation=True needs precompute_codebooks=True (the loss reads the codebooks)")
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token")
        self.pad_token_id = int(tokenizer.pad_token_id)
        self.initial_vocab_size = int(tokenizer.initial_vocab_size)
        self.padding_side = padding_side or tokenizer.padding_side
        if self.padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {self.padding_side!r}")
        self.pad_to_multiple_of = (
            None if pad_to_multiple_of is None else setting("pad_to_multiple_of", pad_to_multiple_of, 1)
        )
        self.max_length = None if max_length is None else setting("max_length", max_length, 1)
        self.codec = tokenizer.codec if precompute_codebooks else None
        self.distillation = distillation

    def __call__(self, features: Iterable[dict[str, Any]]) -> dict[str, Any]:
        rows = []
        for index, feature in enumerate(features):
            if not isinstance(feature, Mapping) or "input_ids" not in feature:
                raise ValueError(f"row {index} has no 'input_ids' (got {type(feature).__name__})")
            try:
                ids = as_id_list(feature["input_ids"])  # ints only: a float is refused, never truncated
            except ValueError as error:
                raise ValueError(f"row {index}: input_ids {str(error).removeprefix('ids ')}") from None
            if not ids:
                raise ValueError(f"row {index} has no input_ids")
            if self.max_length is not None and len(ids) > self.max_length:
                raise ValueError(
                    f"a row has {len(ids)} ids > max_length={self.max_length}: cut documents in base space "
                    "with compress_dataset instead of slicing compressed ids"
                )
            rows.append(ids)
        if not rows:
            raise ValueError("the collator got an empty batch (no rows)")
        width = max(len(r) for r in rows)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for b, ids in enumerate(rows):
            span = slice(width - len(ids), width) if self.padding_side == "left" else slice(0, len(ids))
            input_ids[b, span] = torch.tensor(ids, dtype=torch.long)
            attention_mask[b, span] = 1
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        if self.codec is not None:
            batch["codebooks"] = codebook_tensors(self.codec, input_ids, attention_mask)
        if self.distillation:
            batch["distillation"] = alignment_tensors(self.codec, input_ids, attention_mask)
        return batch
