"""`DeviceCodebooks`: the codebooks of a batch as fixed-shape tensors, updated by tensor operations.

The Python `LZWStream` is the oracle: on random legal streams (model-like: any installed id, the
provisional one, disabled ids, padding) the tensor state equals the stream after every step.
"""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from utils import codecs, legal_ids
from zip2zip_hf.device_codebooks import DeviceCodebooks
from zip2zip_hf.lzw import LZWCodec


PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def assert_matches(state: DeviceCodebooks, streams, num_real) -> None:
    """Every row of the tensor state equals its Python stream."""
    V = state.codec.initial_vocab_size
    provisional, provisional_length = state.provisional()
    for b, stream in enumerate(streams):
        n = stream.num_installed
        assert int(state.num_installed[b]) == n
        contents = [state.content[b, k, : int(state.length[b, k])].tolist() for k in range(n)]
        assert contents == stream.codebook.to_list()
        assert int(state.pending[b]) == stream._w
        if stream._w >= 0:
            phrase = list(stream.codebook.get_subtokens(stream._w))
            assert int(state.pending_length[b]) == stream._wlen == len(phrase)
            assert state.pending_content[b, : len(phrase)].tolist() == phrase
        assert int(state.num_base_ids[b]) == stream.num_base_ids
        assert int(state.num_real_tokens[b]) == num_real[b]
        expected = stream.provisional_subtokens()
        got = provisional[b, : int(provisional_length[b])].tolist()
        assert (got or None) == (list(expected) if expected else None)
        assert int(state.num_legal_hyper[b]) == stream.num_legal_hyper
        assert {V + k for k in range(n)} == {code for code in range(V, V + n) if code in stream.codebook}


@PROPERTY
@given(codecs(), st.integers(1, 3), st.data())
def test_feeding_equals_the_python_streams(codec, batch_size, data):
    streams = [codec.stream() for _ in range(batch_size)]
    state = DeviceCodebooks(codec, batch_size)
    num_real = [0] * batch_size
    for _ in range(data.draw(st.integers(1, 25))):
        codes = [data.draw(st.sampled_from(legal_ids(stream))) for stream in streams]
        real = [data.draw(st.sampled_from([True, True, True, False])) for _ in streams]
        installed_before = [s.num_installed for s in streams]
        expected_lengths = []
        for b, (stream, code, is_real) in enumerate(zip(streams, codes, real)):
            before = stream.num_base_ids
            if is_real:
                stream.feed(code)
                num_real[b] += 1
            expected_lengths.append(stream.num_base_ids - before)
        lengths, created, legality = state.feed(torch.tensor(codes), torch.tensor(real))
        assert lengths.tolist() == expected_lengths and not legality.any()
        for b, stream in enumerate(streams):
            new = [k for k in created[b].tolist() if k < codec.max_codebook_size]
            assert new == list(range(installed_before[b], stream.num_installed))
        assert_matches(state, streams, num_real)


@PROPERTY
@given(codecs(), st.data())
def test_from_streams_equals_feeding_from_the_start(codec, data):
    stream = codec.stream()
    fed = DeviceCodebooks(codec, 1)
    for _ in range(data.draw(st.integers(0, 20))):
        code = data.draw(st.sampled_from(legal_ids(stream)))
        stream.feed(code)
        fed.feed(torch.tensor([code]), torch.tensor([True]))
    built = DeviceCodebooks.from_streams(codec, [stream], [stream.num_codes])
    assert_matches(built, [stream], [stream.num_codes])
    assert_matches(fed, [stream], [stream.num_codes])


def test_feed_reports_illegal_ids_and_they_stand_for_nothing():
    codec = LZWCodec(10, 5, 3)
    state = DeviceCodebooks(codec, 4)
    real = torch.tensor([True, True, True, False])
    for code in (1, 2):
        state.feed(torch.full((4,), code), real)
    snapshot = state.snapshot()
    # Entry 10 = [1, 2] exists and 11 = [2, 2] is the provisional id; 12 is not legal, 15 is outside
    # the id space even on padding, and padding may hold anything inside it.
    lengths, _, legality = state.feed(torch.tensor([11, 12, 15, 13]), real)
    assert legality.tolist() == [0, 2, 1, 0] and lengths.tolist() == [2, 0, 0, 0]
    state.restore(snapshot)
    installed, pending = state.num_installed.clone(), state.pending.clone()
    lengths, created, legality = state.feed(torch.tensor([-1, 12, 15, 15]), real)
    assert legality.tolist() == [1, 2, 1, 1] and lengths.tolist() == [0, 0, 0, 0]
    assert (created >= codec.max_codebook_size).all()
    assert torch.equal(state.num_installed, installed) and torch.equal(state.pending, pending)


def test_select_snapshot_and_restore():
    codec = LZWCodec(10, 8, 3, disabled_ids={0})
    rows = [[1, 2, 10, 3], [4, 4, 10, 5]]
    state = DeviceCodebooks(codec, 2)
    streams = [codec.stream() for _ in rows]
    for t in range(2):
        state.feed(torch.tensor([r[t] for r in rows]), torch.tensor([True, True]))
        for stream, row in zip(streams, rows):
            stream.feed(row[t])
    snapshot = state.snapshot()
    for t in range(2, 4):
        state.feed(torch.tensor([r[t] for r in rows]), torch.tensor([True, True]))
    state.restore(snapshot)
    assert_matches(state, streams, [2, 2])
    for t in range(2, 4):  # fed again after the rollback: as if never rolled back
        state.feed(torch.tensor([r[t] for r in rows]), torch.tensor([True, True]))
        for stream, row in zip(streams, rows):
            stream.feed(row[t])
    assert_matches(state, streams, [4, 4])
    state.select(torch.tensor([1, 1, 0]))
    assert_matches(state, [streams[1], streams[1], streams[0]], [4, 4, 4])
