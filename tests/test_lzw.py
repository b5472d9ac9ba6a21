"""The LZW codec (`zip2zip_hf.lzw`): golden vectors, reference vectors, properties, errors, and the
reference Rust codec (`zip2zip-compression`) as an oracle when it is installed."""

from __future__ import annotations

import json
import re
import sysconfig
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from zip2zip_hf.lzw import LZWCodec, LZWStream
from zip2zip_hf.lzw_codebook import Codebook


DATA = Path(__file__).parent / "data" / "lzw_reference_vectors.json"
REFERENCE_CASES = json.loads(DATA.read_text())["cases"]

# Every property runs on many small examples; no deadline, as the machine may be busy.
PROPERTY = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
BIG_K = 10_000


# ----------------------------------------------------------------------------------------------- strategies


@st.composite
def codecs(draw, max_vocab: int = 12) -> LZWCodec:
    """Small vocabularies (so texts repeat), K and M from tiny to large, any disabled ids."""
    V = draw(st.integers(1, max_vocab))
    K = draw(st.sampled_from([0, 1, 2, 3, 5, 8, BIG_K]))
    M = draw(st.sampled_from([1, 2, 3, 4, 8]))
    disabled = draw(st.sets(st.integers(0, V - 1), max_size=min(3, V)))
    return LZWCodec(V, K, M, disabled)


@st.composite
def texts(draw, codec: LZWCodec, max_size: int = 60) -> list[int]:
    """Base ids over a few symbols (disabled ones possible anywhere), sometimes with long runs."""
    V = codec.initial_vocab_size
    symbols = draw(st.lists(st.integers(0, V - 1), min_size=1, max_size=4, unique=True))
    runs = draw(
        st.lists(
            st.tuples(st.sampled_from(symbols), st.integers(1, draw(st.sampled_from([1, 3, 12])))),
            max_size=max_size,
        )
    )
    return [symbol for symbol, count in runs for _ in range(count)][: max_size * 2]


@st.composite
def codec_and_text(draw, max_vocab: int = 12, max_size: int = 60):
    codec = draw(codecs(max_vocab))
    return codec, draw(texts(codec, max_size))


def legal_ids(stream: LZWStream) -> list[int]:
    V = stream.codec.initial_vocab_size
    return list(range(V + stream.num_legal_hyper))


def pending_phrase(codec: LZWCodec, base_ids: list[int]) -> tuple[int, ...] | None:
    """The phrase greedy LZW still holds after ``base_ids``, from `encode` alone: its last code."""
    if not base_ids or base_ids[-1] in codec.disabled_ids:
        return None
    codes, codebook = codec.encode(base_ids)
    return tuple(codebook.get_subtokens(codes[-1]))


# ----------------------------------------------------------------------------------------------- golden vectors


def test_golden_design_example():
    codes, codebook = LZWCodec(10, 5, 3).encode([1, 2, 1, 2, 1, 2, 1, 2, 3, 3, 3, 3])
    assert codes == [1, 2, 10, 12, 2, 3, 14, 3]
    assert codebook.to_dict() == {10: [1, 2], 11: [2, 1], 12: [1, 2, 1], 13: [2, 3], 14: [3, 3]}
    assert codebook.is_full and len(codebook) == 5


def test_golden_disabled():
    codes, codebook = LZWCodec(10, 5, 3, disabled_ids={9}).encode([1, 2, 9, 1, 2, 9, 1, 2, 1, 2])
    assert codes == [1, 2, 9, 10, 9, 10, 10]
    assert all(9 not in entry for entry in codebook.to_dict().values())


def test_golden_run_every_code_kwkwk():
    codec = LZWCodec(50, 8, 4)
    codes, codebook = codec.encode([5, 5, 5, 5, 5, 5])
    assert codes == [5, 50, 51]
    assert codebook.to_dict() == {50: [5, 5], 51: [5, 5, 5]}
    assert codec.decode(codes) == ([5] * 6, codebook)


def test_golden_canonical_decode():
    """The model emits a non-greedy stream; the codebook is still `encode`'s on the decoded text."""
    codec = LZWCodec(50, BIG_K, 4)
    base_ids, codebook = codec.decode([2, 3, 50, 3, 52])
    assert base_ids == [2, 3, 2, 3, 3, 2, 3, 3]
    expected = {50: [2, 3], 51: [3, 2], 52: [2, 3, 3], 53: [3, 2, 3], 54: [3, 3]}
    assert codebook.to_dict() == expected
    codes, greedy = codec.encode(base_ids)
    assert codes == [2, 3, 50, 51, 3, 3]
    assert greedy.to_dict() == expected and greedy == codebook


def test_reference_vector_file_is_complete():
    assert len(REFERENCE_CASES) == 300


@pytest.mark.parametrize("case", REFERENCE_CASES, ids=lambda case: f"V{case['initial_vocab_size']}")
def test_reference_vectors(case):
    settings_ = (case["initial_vocab_size"], case["max_codebook_size"], case["max_subtokens"], case["disabled_ids"])
    codec = LZWCodec(*settings_)
    codes, codebook = codec.encode(case["input"])
    assert codes == case["codes"]
    assert codebook.to_dict() == {int(k): v for k, v in case["codebook"].items()}
    assert codec.decode(codes) == (case["input"], codebook)


# ----------------------------------------------------------------------------------------------- properties


@PROPERTY
@given(codec_and_text())
def test_round_trip(example):
    codec, ids = example
    codes, codebook = codec.encode(ids)
    base_ids, decoded_codebook = codec.decode(codes)
    assert base_ids == ids
    assert decoded_codebook == codebook
    assert decoded_codebook.to_dict() == codebook.to_dict()


@PROPERTY
@given(codec_and_text())
def test_codebook_invariants(example):
    codec, ids = example
    V, K, M = codec.initial_vocab_size, codec.max_codebook_size, codec.max_subtokens
    codes, codebook = codec.encode(ids)
    entries = codebook.to_dict()
    assert list(entries) == list(range(V, V + len(codebook)))
    assert len(codebook) <= K and codebook.is_full == (len(codebook) == K)
    assert len({tuple(e) for e in entries.values()}) == len(entries)  # no duplicate entries
    for entry in entries.values():
        assert 2 <= len(entry) <= M
        assert not set(entry) & codec.disabled_ids
        if len(entry) > 2:  # prefix closed: an entry is an older entry plus one base id
            assert entries[min(k for k, e in entries.items() if e == entry[:-1])] == entry[:-1]
    # Codes: only base ids and installed entries; lengths add up; each disabled id emitted alone.
    assert sum(len(codebook.get_subtokens(c)) for c in codes) == len(ids)
    assert all(0 <= c < V + len(codebook) for c in codes)
    assert [c for c in codes if c in codec.disabled_ids] == [i for i in ids if i in codec.disabled_ids]
    if K == 0 or M == 1:
        assert codes == ids and len(codebook) == 0
    if ids:
        assert len(codes) <= len(ids)


@PROPERTY
@given(codec_and_text(), st.data())
def test_prefix_stability(example, data):
    codec, ids = example
    cut = data.draw(st.integers(0, len(ids)))
    short_codes, short_codebook = codec.encode(ids[:cut])
    codes, codebook = codec.encode(ids)
    # A longer input only appends entries ...
    short_entries = list(short_codebook.to_dict().items())
    assert list(codebook.to_dict().items())[: len(short_entries)] == short_entries
    # ... and the prefix's codes are a prefix of the codes, except possibly the last one.
    assert short_codes[:-1] == codes[: max(len(short_codes) - 1, 0)]
    assert len(short_codes) <= len(codes)


@PROPERTY
@given(codec_and_text(), st.data())
def test_continuation_is_what_encode_writes_after_any_prefix_of_its_codes(example, data):
    codec, ids = example
    codes, _ = codec.encode(ids)
    cut = data.draw(st.integers(0, len(codes)))
    stream = codec.stream()
    prefix_base: list[int] = []
    stream.feed(codes[:cut], out=prefix_base)
    before = stream.mark(), stream.codebook.copy()
    assert stream.continuation(ids[len(prefix_base) :]) == codes[cut:]
    most = data.draw(st.integers(0, len(codes) - cut))
    assert stream.continuation(ids[len(prefix_base) :], max_codes=most) == codes[cut : cut + most]
    assert (stream.mark(), stream.codebook) == before  # the stream is left as it was


@PROPERTY
@given(codec_and_text(), st.data())
def test_streaming_equals_batch(example, data):
    codec, ids = example
    codes, codebook = codec.encode(ids)
    expected_base, expected_codebook = codec.decode(codes)

    one_by_one = codec.stream()
    base_ids, installed = [], []
    for code in codes:
        installed += one_by_one.feed(code, out=base_ids)
    assert base_ids == expected_base == ids
    assert one_by_one.codebook == expected_codebook == codebook
    assert [(hyper, list(content)) for hyper, content in installed] == list(codebook.to_dict().items())
    assert one_by_one.num_codes == len(codes) and one_by_one.num_base_ids == len(ids)

    blocks = codec.stream()
    base_ids, installed, lengths, i = [], [], [], 0
    while i < len(codes):
        size = data.draw(st.integers(1, 8))
        installed += blocks.feed(codes[i : i + size], out=base_ids, lengths=lengths)
        i += size
    assert base_ids == ids and blocks.codebook == codebook
    # How many base ids each code stood for: its expansion, in order.
    assert lengths == [len(codebook.get_subtokens(code)) for code in codes] and sum(lengths) == len(ids)
    assert [(hyper, list(content)) for hyper, content in installed] == list(codebook.to_dict().items())
    assert blocks.num_codes == len(codes) and blocks.num_base_ids == len(ids)


@PROPERTY
@given(codecs(max_vocab=6), st.data())
def test_canonical_codebook_on_random_legal_streams(codec, data):
    """A model may emit any legal id, greedy or not: the stream's codebook stays `encode`'s."""
    V = codec.initial_vocab_size
    stream = codec.stream()
    fed, base_ids = [], []
    for _ in range(data.draw(st.integers(0, 40))):
        provisional = stream.provisional_subtokens()
        kind = data.draw(st.sampled_from(["base", "hyper", "provisional"]))
        if kind == "provisional" and provisional is not None:
            code = V + stream.num_installed
            assert stream.expand(code) == provisional
            event("fed the provisional id")
        elif kind == "hyper" and stream.num_installed:
            code = V + data.draw(st.integers(0, stream.num_installed - 1))
            event("fed an installed hyper id")
        else:
            code = data.draw(st.integers(0, V - 1))
        assert code in legal_ids(stream)
        first_illegal = V + stream.num_legal_hyper  # legal ids are exactly 0 .. V + num_legal_hyper - 1
        with pytest.raises(ValueError, match=rf"\b{first_illegal}\b.*position {len(fed)}\b"):
            stream.copy().feed(first_illegal)
        expected_content = stream.expand(code)
        before = stream.codebook.copy()
        installed = stream.feed(code, out=base_ids)
        fed.append(code)
        assert tuple(base_ids[len(base_ids) - len(expected_content) :]) == expected_content
        _, canonical = codec.encode(base_ids)
        assert stream.codebook == canonical
        assert stream.codebook.to_dict() == canonical.to_dict()
        # What feed reports is exactly what was appended to the codebook.
        assert list(stream.codebook.to_dict().items())[len(before) :] == [(h, list(c)) for h, c in installed]
        assert stream.num_codes == len(fed) and stream.num_base_ids == len(base_ids)
    assert codec.decode(fed) == (base_ids, stream.codebook)


@PROPERTY
@given(codecs(max_vocab=6), st.data())
def test_provisional_slot_legal_exactly_when_documented(codec, data):
    """Legal iff w is non-empty, shorter than M, the codebook not full and w + w[0] not an entry;
    feeding it installs exactly w + w[0] (and nothing else) and expands to it."""
    V, M = codec.initial_vocab_size, codec.max_subtokens
    stream = codec.stream()
    base_ids: list[int] = []
    for _ in range(data.draw(st.integers(0, 40))):
        w = pending_phrase(codec, base_ids)
        _, codebook = codec.encode(base_ids)
        entries = [tuple(e) for e in codebook.to_dict().values()]
        legal = w is not None and len(w) < M and not codebook.is_full and w + w[:1] not in entries
        provisional = stream.provisional_subtokens()
        assert (provisional is not None) == legal
        assert stream.num_legal_hyper == len(codebook) + legal
        slot = V + stream.num_installed
        if legal:
            assert provisional == w + w[:1]
            assert stream.expand(slot) == provisional
            if data.draw(st.booleans()):
                installed = stream.feed(slot, out=base_ids)
                assert installed == [(slot, w + w[:1])]
                event("fed the provisional id")
                continue
        else:
            with pytest.raises(ValueError, match=str(slot)):
                stream.copy().feed(slot)
        code = data.draw(st.integers(0, V + stream.num_installed - 1))
        stream.feed(code, out=base_ids)


def test_provisional_slot_run():
    codec = LZWCodec(50, 8, 4)
    stream = codec.stream()
    assert stream.provisional_subtokens() is None and stream.num_legal_hyper == 0
    assert stream.feed(5) == []
    assert stream.provisional_subtokens() == (5, 5) and stream.num_legal_hyper == 1
    assert stream.feed(50) == [(50, (5, 5))]
    assert stream.provisional_subtokens() == (5, 5, 5)
    assert stream.feed(51) == [(51, (5, 5, 5))]
    # w = [5, 5, 5] is shorter than M=4, but [5, 5, 5, 5] is not an entry: the slot is legal again.
    assert stream.provisional_subtokens() == (5, 5, 5, 5)
    assert stream.feed(52) == [(52, (5, 5, 5, 5))]
    # Now w has length M: it can grow no further, so no provisional slot.
    assert stream.provisional_subtokens() is None and stream.num_legal_hyper == 3
    with pytest.raises(ValueError, match="53"):
        stream.feed(53)


def test_provisional_slot_needs_room_and_a_new_entry():
    codec = LZWCodec(10, 1, 4)
    stream = codec.stream()
    stream.feed([1, 2])  # installs [1, 2]: the codebook (K=1) is full
    assert stream.codebook.is_full and stream.provisional_subtokens() is None
    codec = LZWCodec(10, BIG_K, 4)
    stream = codec.stream()
    stream.feed([1, 1, 2])  # entries [1, 1], [1, 2]; w = [2]; [2, 2] is new: legal
    assert stream.provisional_subtokens() == (2, 2)
    stream.feed([1])  # entries + [2, 1]; w = [1]; [1, 1] already exists: not legal
    assert stream.provisional_subtokens() is None
    stream.feed([9])
    assert stream.provisional_subtokens() == (9, 9)
    disabled = LZWCodec(10, BIG_K, 4, disabled_ids={9}).stream()
    disabled.feed([1, 9])  # a disabled id leaves no pending phrase
    assert disabled.provisional_subtokens() is None and disabled.num_legal_hyper == 0


def test_full_codebook_adds_nothing():
    codec = LZWCodec(4, 3, 3)
    ids = [0, 1, 2, 3, 0, 1, 2, 3, 3, 2, 1, 0] * 5
    codes, codebook = codec.encode(ids)
    assert codebook.is_full and len(codebook) == 3
    assert codebook.to_dict() == {4: [0, 1], 5: [1, 2], 6: [2, 3]}
    stream = codec.stream()
    installed = stream.feed(codes[:3])
    assert len(installed) <= 3
    for code in codes[3:]:
        full_before = stream.codebook.is_full
        snapshot = stream.codebook.copy()
        new = stream.feed(code)
        if full_before:
            assert new == [] and stream.codebook == snapshot
            assert stream.provisional_subtokens() is None
    assert stream.codebook == codebook and stream.num_legal_hyper == 3
    # Any further text, however repetitive, changes nothing either.
    more, more_codebook = codec.encode(ids + [0, 0, 0, 0, 1, 1, 1, 1])
    assert more_codebook.to_dict() == codebook.to_dict()
    assert more[: len(codes) - 1] == codes[:-1]


@PROPERTY
@given(codec_and_text(), st.data())
def test_full_codebook_adds_nothing_property(example, data):
    codec, ids = example
    extra = data.draw(texts(codec))
    _, codebook = codec.encode(ids)
    _, longer = codec.encode(ids + extra)
    if codebook.is_full:
        assert longer.to_dict() == codebook.to_dict()


def test_large_settings():
    codec = LZWCodec(50_000, 2048, 8)
    ids = list(range(1000, 1020)) * 100
    codes, codebook = codec.encode(ids)
    assert len(codes) < len(ids) / 6
    assert max(len(e) for e in codebook.to_dict().values()) == 8
    assert codec.decode(codes) == (ids, codebook)


# ----------------------------------------------------------------------------------------------- errors


def test_decode_rejects_uninstalled_hyper_id():
    codec = LZWCodec(10, 5, 3)
    # After [1, 2] entry 10 = [1, 2] exists and the provisional slot is 11 = [2, 2]; 12 is illegal.
    with pytest.raises(ValueError, match=r"\b12\b.*position 2"):
        codec.decode([1, 2, 12])
    with pytest.raises(ValueError, match=r"\b11\b.*position 0"):
        codec.decode([11])
    with pytest.raises(ValueError, match=r"\b10\b.*position 0"):
        codec.decode([10])  # nothing pending: not even the provisional slot


def test_decode_rejects_ids_outside_the_id_space():
    codec = LZWCodec(10, 5, 3)
    with pytest.raises(ValueError, match=r"\b15\b.*position 1"):
        codec.decode([1, 15])
    with pytest.raises(ValueError, match=r"\b1000\b.*position 3"):
        codec.decode([1, 2, 3, 1000])
    with pytest.raises(ValueError, match=r"-1\b.*position 2"):
        codec.decode([1, 2, -1])


def test_feed_error_leaves_the_ids_before_it_consumed():
    codec = LZWCodec(10, 5, 3)
    stream = codec.stream()
    base_ids: list[int] = []
    with pytest.raises(ValueError, match=r"\b13\b.*position 3"):
        stream.feed([1, 2, 10, 13, 4], out=base_ids)
    assert base_ids == [1, 2, 1, 2]
    assert stream.num_codes == 3 and stream.num_base_ids == 4
    reference = codec.stream()
    reference.feed([1, 2, 10])
    assert stream.codebook == reference.codebook
    assert stream.provisional_subtokens() == reference.provisional_subtokens()
    stream.feed([3], out=base_ids)  # and it carries on as if the bad id had never come
    reference.feed([3])
    assert stream.codebook == reference.codebook and base_ids == [1, 2, 1, 2, 3]
    with pytest.raises(ValueError, match=r"\b99\b.*position 7"):
        stream.expand(99, position=7)


@pytest.mark.parametrize("bad, position", [([10], 0), ([1, 2, 11], 2), ([-1], 0), ([3, -5, 2], 1), ([1, 10**9], 1)])
def test_encode_rejects_non_base_ids(bad, position):
    codec = LZWCodec(10, 5, 3)
    value = next(c for c in bad if not 0 <= c < 10)
    with pytest.raises(ValueError, match=rf"(?<![\d-]){re.escape(f'{value} at position {position}')}"):
        codec.encode(bad)


@pytest.mark.parametrize("bad", [[True, False], [1, True], [1, 2.0], [1, "2"], [None], [[1, 2]]])
def test_ids_that_are_not_ints_are_refused_by_position(bad):
    """A bool is an int to Python, but never an id: ``[True, False]`` would otherwise encode as [1, 0]."""
    codec = LZWCodec(10, 5, 3)
    position = next(i for i, value in enumerate(bad) if type(value) is not int)
    for call in (codec.encode, codec.decode, lambda ids: codec.stream().feed(ids)):
        with pytest.raises(ValueError, match=rf"ids must be ints: got .* at position {position}\b"):
            call(bad)
    assert codec.encode(np.array([1, 2, 1, 2]))[0] == codec.encode([1, 2, 1, 2])[0]  # numpy ints are welcome


@pytest.mark.parametrize(
    "args",
    [
        (0, 5, 3),
        (-3, 5, 3),
        (10, -1, 3),
        (10, 5, 0),
        (10, 5, -2),
        (10, 5, 3, [10]),
        (10, 5, 3, [-1]),
        (10.0, 5, 3),
        (10, "5", 3),
        (10, 5, None),
        (True, 5, 3),
    ],
)
def test_constructor_rejects_bad_settings(args):
    with pytest.raises(ValueError):
        LZWCodec(*args)


def test_codebook_api():
    codec = LZWCodec(10, 5, 3)
    codes, codebook = codec.encode([1, 2, 1, 2, 1, 2, 1, 2, 3, 3, 3, 3])
    assert isinstance(codebook, Codebook)
    assert codebook.get_subtokens(4) == (4,)
    assert codebook.get_subtokens(12) == (1, 2, 1)
    assert 12 in codebook and 15 not in codebook and 3 not in codebook
    assert codebook.to_list() == [[1, 2], [2, 1], [1, 2, 1], [2, 3], [3, 3]]
    with pytest.raises(ValueError, match="15"):
        codebook.get_subtokens(15)
    with pytest.raises(ValueError, match="-1"):
        codebook.get_subtokens(-1)
    clone = codebook.copy()
    assert clone == codebook and clone is not codebook
    stream = codec.stream()
    stream.feed(codes[:2])
    fork = stream.copy()
    fork.feed(codes[2:])
    assert len(stream.codebook) == 1 and stream.num_codes == 2 and len(fork.codebook) == 5
    stream.feed(codes[2:])
    assert stream.codebook == fork.codebook == codebook
    assert codec.batch_encode([[1, 2], [3]]) == [codec.encode([1, 2]), codec.encode([3])]
    assert codec.batch_decode([[1, 2, 10], [3]]) == [codec.decode([1, 2, 10]), codec.decode([3])]
    assert codec.total_vocab_size == 15


def test_accepts_tuples_ranges_and_arrays():
    np = pytest.importorskip("numpy")
    codec = LZWCodec(10, 5, 3)
    ids = [1, 2, 1, 2, 1, 2]
    expected = codec.encode(ids)
    assert codec.encode(tuple(ids)) == expected
    assert codec.encode(np.array(ids)) == expected
    assert codec.decode(np.array(expected[0]))[0] == ids
    assert codec.encode(range(3)) == codec.encode([0, 1, 2])
    stream = codec.stream()
    stream.feed(np.int64(1))
    assert stream.num_codes == 1


# ----------------------------------------------------------------------------------------------- the oracle


@st.composite
def reference_settings(draw):
    V = draw(st.sampled_from([2, 3, 5, 16, 1000, 49152]))
    K = draw(st.sampled_from([0, 1, 2, 3, 8, 64, 2048]))
    M = draw(st.sampled_from([1, 2, 3, 4, 8]))
    pad = draw(st.integers(0, V - 1))
    disabled = draw(st.sets(st.integers(0, V - 1), max_size=4)) | {pad}
    return V, K, M, pad, sorted(disabled)


@PROPERTY
@given(reference_settings(), st.data())
def test_encode_matches_reference_codec(config, data):
    zip2zip_compression = pytest.importorskip("zip2zip_compression")
    V, K, M, pad, disabled = config
    symbols = data.draw(st.lists(st.integers(0, V - 1), min_size=1, max_size=5, unique=True))
    symbols += data.draw(st.lists(st.sampled_from(disabled), max_size=2))  # disabled ids anywhere
    runs = data.draw(st.lists(st.tuples(st.sampled_from(symbols), st.integers(1, 6)), max_size=60))
    ids = [symbol for symbol, count in runs for _ in range(count)]
    reference = zip2zip_compression.LZWCompressor(V, K, M, pad, disabled)
    ref_codes, ref_mask, ref_codebook = reference.encode(ids)
    codec = LZWCodec(V, K, M, disabled)
    codes, codebook = codec.encode(ids)
    assert codes == ref_codes
    assert ref_mask == [int(code != pad) for code in codes]  # the reference masks out its pad id
    assert codebook.to_dict() == ref_codebook.to_dict()
    # On greedy streams the reference decoder and ours agree too.
    ref_base, ref_decoded_codebook = reference.decode(codes)
    assert ref_base == ids
    assert ref_decoded_codebook.to_dict() == codebook.to_dict()


def test_reference_decoder_is_not_canonical():
    """Why we do not reuse the reference decoder on model output: it misses [3, 3] here."""
    zip2zip_compression = pytest.importorskip("zip2zip_compression")
    reference = zip2zip_compression.LZWCompressor(50, 100, 4, 0, [0])
    base_ids, ref_codebook = reference.decode([2, 3, 50, 3, 52])
    ours = LZWCodec(50, 100, 4, [0]).decode([2, 3, 50, 3, 52])
    assert base_ids == ours[0]
    assert 54 in ours[1] and ref_codebook.to_dict() != ours[1].to_dict()


def test_encode_matches_reference_codec_on_real_text():
    """Long, realistic inputs: BPE-ish ids of Python source (no tokenizer needed: words -> ids)."""
    zip2zip_compression = pytest.importorskip("zip2zip_compression")
    source = (Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py").read_text()
    vocab: dict[str, int] = {}
    ids = [vocab.setdefault(tok, len(vocab) + 3) % 5000 for tok in re.findall(r"\w+|\s+|[^\w\s]", source)]
    for window in (ids, ids[:1024], ids[5000:9096]):
        for K, M in ((2048, 4), (16, 3), (3000, 8)):
            reference = zip2zip_compression.LZWCompressor(5000, K, M, 0, [0, 1, 2])
            ref_codes, _, ref_codebook = reference.encode(window)
            codes, codebook = LZWCodec(5000, K, M, [0, 1, 2]).encode(window)
            assert codes == ref_codes and codebook.to_dict() == ref_codebook.to_dict()
