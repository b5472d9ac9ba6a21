"""Cropping the cache: the codebooks go back with the keys and values, exactly.

The oracle is never having cropped: crop(n) and then feeding the same ids again gives the same
logits, the same codebooks and the same cache length as feeding them once, in either codebook phase
(Python streams, `DeviceCodebooks`), with dynamic and static caches, with padding.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from utils import assert_same_logits, codebooks_on_device, compressed, left_pad
from zip2zip_hf import _compat
from zip2zip_hf.cache_zip2zip import Zip2ZipCache, Zip2ZipStaticCache
from zip2zip_hf.hyper_state import HyperState


PROPERTY = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def codebook_state(state) -> list[tuple]:
    """Per row: entry contents, pending phrase code, base ids and real ids consumed."""
    if hasattr(state.store, "streams"):
        return [
            (s.codebook.to_list(), s._w, s.num_base_ids, n)
            for s, n in zip(state.store.streams, state.store.num_real_tokens, strict=True)
        ]
    c = state.store.codebooks
    return [
        (
            [c.content[b, k, : int(c.length[b, k])].tolist() for k in range(int(c.num_installed[b]))],
            int(c.pending[b]),
            int(c.num_base_ids[b]),
            int(c.num_real_tokens[b]),
        )
        for b in range(state.batch_size)
    ]


def feed(model, ids, mask, cache, start: int, sizes: list[int]):
    """Feed ``ids[:, start:]`` in blocks of ``sizes`` (the last block takes the rest); return the logits."""
    logits, t = [], start
    for size in [*sizes, ids.shape[1]]:
        end = min(t + size, ids.shape[1])
        if end > t:
            out = model(input_ids=ids[:, t:end], attention_mask=mask[:, :end], cache=cache, use_cache=True)
            logits.append(out.logits)
            cache = out.past_key_values
        t = end
    return torch.cat(logits, dim=1), cache


def new_cache(model, static: bool, length: int):
    if static:
        return Zip2ZipStaticCache(config=model.config.get_text_config(), max_cache_len=length)
    return Zip2ZipCache(config=model.config.get_text_config())


@PROPERTY
@given(
    seed=st.integers(0, 10_000),
    prompt=st.integers(1, 12),
    sizes=st.lists(st.integers(1, 4), min_size=1, max_size=8),
    refeed=st.lists(st.integers(1, 4), max_size=6),
    data=st.data(),
)
@pytest.mark.parametrize("on_device", [False, True])
@pytest.mark.parametrize("static", [False, True])
def test_crop_then_feeding_again_equals_never_cropping(model, on_device, static, seed, prompt, sizes, refeed, data):
    rows = [compressed(seed, 40), compressed(seed + 1, 28)]
    ids, mask = left_pad(rows)
    total = ids.shape[1]
    with codebooks_on_device(model, on_device), torch.no_grad():
        whole = model(input_ids=ids, attention_mask=mask).logits
        _, once = feed(model, ids, mask, new_cache(model, static, total), 0, [prompt, *sizes])
        fed_upto = min(total, prompt + sum(sizes))
        _, cache = feed(
            model, ids[:, :fed_upto], mask[:, :fed_upto], new_cache(model, static, total), 0, [prompt, *sizes]
        )
        length = data.draw(st.integers(0, fed_upto), label="length")
        if length < fed_upto:
            cache.crop(length - fed_upto)  # negative: how many to remove, in every release
        assert cache.hyper_state.num_positions == int(cache.get_seq_length()) == length
        if length < total:
            again, cache = feed(model, ids, mask, cache, length, refeed)
            assert_same_logits(again, whole[:, length:], mask[:, length:])
    assert codebook_state(cache.hyper_state) == codebook_state(once.hyper_state)
    assert cache.hyper_state.num_positions == once.hyper_state.num_positions == total


@pytest.mark.parametrize("on_device", [False, True])
def test_crop_within_the_last_block_restores_its_snapshot_and_further_back_rebuilds(model, on_device, monkeypatch):
    """Both ways to rewind are exercised and give the same state as feeding the kept ids alone."""
    ids = torch.tensor([compressed(5, 60)])
    mask = torch.ones_like(ids)
    monkeypatch.setattr(model, "codebooks_on_device", on_device)
    rebuilt = []
    real_rebuild = HyperState._rebuild
    monkeypatch.setattr(
        HyperState, "_rebuild", lambda self, fed: (rebuilt.append(fed.shape[1]), real_rebuild(self, fed))
    )
    assert ids.shape[1] > 26
    with torch.no_grad():
        _, cache = feed(model, ids, mask, None, 0, [20, 1, 1])  # blocks [0, 20), 20, 21, [22, end)
        cache.crop(26)  # inside the last block: its snapshot, then 4 ids again
        assert rebuilt == []
        cache.crop(10)  # inside the prompt: rebuilt from the recorded ids
        assert rebuilt == [10]
        _, alone = feed(model, ids[:, :10], mask[:, :10], None, 0, [10])
    assert codebook_state(cache.hyper_state) == codebook_state(alone.hyper_state)


def test_crop_arguments_follow_the_installed_release(model):
    ids = torch.tensor([compressed(7, 30)])
    with torch.no_grad():
        cache = model(input_ids=ids, use_cache=True).past_key_values
        n = cache.hyper_state.num_positions
        cache.crop(-2)
        assert cache.hyper_state.num_positions == int(cache.get_seq_length()) == n - 2
        cache.crop(n - 5)
        assert cache.hyper_state.num_positions == n - 5
        for integer_like in (np.int64(n - 6), torch.tensor(n - 7)):  # as transformers' caches take them
            cache.crop(integer_like)
            assert cache.hyper_state.num_positions == int(cache.get_seq_length()) == int(integer_like)
        n = int(cache.get_seq_length()) + 5
        cache.crop(0)
        expected = n - 5 if _compat.crop_zero_removes_nothing() else 0
        assert cache.hyper_state.num_positions == int(cache.get_seq_length()) == expected


@pytest.mark.parametrize("bad", [-1000, 1.5, True, "2", torch.tensor(2.0), torch.tensor(True), np.float64(3)])
def test_a_bad_crop_is_an_error_that_changes_nothing(model, bad):
    ids = torch.tensor([compressed(8, 30)])
    with torch.no_grad():
        cache = model(input_ids=ids, use_cache=True).past_key_values
    before = codebook_state(cache.hyper_state), cache.hyper_state.num_positions, int(cache.get_seq_length())
    with pytest.raises(ValueError, match="crop"):
        cache.crop(bad)
    assert (codebook_state(cache.hyper_state), cache.hyper_state.num_positions, int(cache.get_seq_length())) == before


@pytest.mark.parametrize("on_device", [False, True])
@pytest.mark.parametrize("static", [False, True])
def test_reset_empties_the_codebooks_with_the_keys_and_values(model, on_device, static, monkeypatch):
    """`cache.reset()` (transformers' way to reuse a cache for new sequences) forgets the codebooks
    too: the next sequences read exactly as with a new cache, never against the old entries."""
    monkeypatch.setattr(model, "codebooks_on_device", on_device)
    first, _ = left_pad([compressed(3, 40), compressed(4, 30)])
    ids, mask = left_pad([compressed(5, 36), compressed(6, 20)])
    with torch.no_grad():
        _, cache = feed(model, first, torch.ones_like(first), new_cache(model, static, 64), 0, [30, 1, 1])
        cache.reset()
        assert cache.hyper_state is None and int(cache.get_seq_length()) == 0
        again, cache = feed(model, ids, mask, cache, 0, [20, 1, 1, 1])
        fresh, expected = feed(model, ids, mask, new_cache(model, static, 64), 0, [20, 1, 1, 1])
    assert_same_logits(again, fresh, mask)
    assert codebook_state(cache.hyper_state) == codebook_state(expected.hyper_state)
