"""The two codebook stores behind `HyperState` answer every question alike.

`StreamStore` (Python streams) and `TensorStore` (`DeviceCodebooks`) are fed the same random legal
blocks (model-like ids: installed, provisional, disabled, padding), with row selections and
snapshot restores between them, and must give the same `ConsumedBlock`, the same new entries and
the same codebooks throughout.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from utils import codecs, legal_ids
from zip2zip_hf.codebook_stores import CodebookStore, StreamStore, TensorStore
from zip2zip_hf.device_codebooks import DeviceCodebooks


PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FIELDS = ("lengths", "positions", "legal", "provisional_lengths")


def draw_block(data, streams, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, length)`` ids legal for each row from where its stream stands, and the padding mask."""
    ids, real = [], []
    for stream in streams:
        scratch, row, row_real = stream.copy(), [], []
        for _ in range(length):
            is_real = data.draw(st.integers(0, 4)) > 0
            code = data.draw(st.sampled_from(legal_ids(scratch))) if is_real else 0
            if is_real:
                scratch.feed([code])
            row.append(code)
            row_real.append(is_real)
        ids.append(row)
        real.append(row_real)
    return torch.tensor(ids), torch.tensor(real)


def new_entries(rows, entries) -> set[tuple[int, int, tuple[int, ...]]]:
    """``(row, slot, content)`` of the entries to encode (the tensor store's sink slot K left out)."""
    K = rows_codec(rows).max_codebook_size
    found = set()
    for r, k, content, n in zip(
        entries.rows.tolist(), entries.slots.tolist(), entries.subtokens.tolist(), entries.lengths.tolist()
    ):
        if k < K:
            found.add((r, k, tuple(content[:n])))
    return found


def rows_codec(rows):
    return rows.codec if isinstance(rows, StreamStore) else rows.codebooks.codec


def codebooks(rows) -> list[list[list[int]]]:
    if isinstance(rows, StreamStore):
        return [stream.codebook.to_list() for stream in rows.streams]
    c = rows.codebooks
    return [
        [c.content[b, k, : int(c.length[b, k])].tolist() for k in range(int(c.num_installed[b]))]
        for b in range(rows.batch_size)
    ]


def consume(rows, ids, real, position_mode):
    block = rows.consume(ids, real, list(range(ids.shape[1])), position_mode)
    rows.raise_if_illegal()
    entries = rows.unencoded_entries()
    rows.table_capacity(entries, 0)  # counts them as encoded
    return block, new_entries(rows, entries)


@PROPERTY
@given(codecs(), st.integers(1, 3), st.sampled_from(["base", "compressed"]), st.data())
def test_both_stores_answer_every_question_alike(codec, batch_size, position_mode, data):
    host = StreamStore(codec, [codec.stream() for _ in range(batch_size)])
    device = TensorStore(DeviceCodebooks(codec, batch_size))
    saved = None
    for _ in range(data.draw(st.integers(1, 6), label="blocks")):
        action = data.draw(st.sampled_from(["feed", "feed", "select", "snapshot", "restore"]), label="action")
        if action == "select":
            rows = data.draw(st.lists(st.integers(0, batch_size - 1), min_size=batch_size, max_size=batch_size))
            host.select(rows)
            device.select(rows)
            saved = None  # a snapshot holds no rows to select
        elif action == "snapshot":
            saved = host.snapshot(), device.snapshot()
        elif action == "restore" and saved is not None:
            host.restore(saved[0])
            device.restore(saved[1])
        else:
            ids, real = draw_block(data, host.streams, data.draw(st.integers(1, 5), label="length"))
            (host_block, host_new), (device_block, device_new) = (
                consume(rows, ids, real, position_mode) for rows in (host, device)
            )
            for field in FIELDS:
                assert torch.equal(getattr(host_block, field), getattr(device_block, field)), field
            # A provisional slot's content counts up to its length (past it, it is never read).
            read = torch.arange(codec.max_subtokens) < host_block.provisional_lengths[..., None]
            assert torch.equal(host_block.provisional * read, device_block.provisional * read)
            assert host_new == device_new
        assert codebooks(host) == codebooks(device)


@pytest.mark.parametrize("store", [StreamStore, TensorStore])
def test_each_store_implements_the_declared_interface(store):
    """`CodebookStore` declares what `HyperState` asks; each store has every one of its methods, with
    the same parameters."""
    declared = {
        name: member
        for name, member in vars(CodebookStore).items()
        if not name.startswith("_") and (callable(member) or isinstance(member, property))
    }
    assert declared, "CodebookStore declares no method"
    for name, member in declared.items():
        assert hasattr(store, name), f"{store.__name__} lacks {name}"
        if callable(member):
            expected = list(inspect.signature(member).parameters)
            assert list(inspect.signature(getattr(store, name)).parameters) == expected, name
