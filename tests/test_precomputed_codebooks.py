"""forward(codebooks=...): precomputed codebooks are checked against the ids and the settings.

The oracle for "right" is `codebook_tensors` of the same ids; every corruption below must be an
error naming what is wrong, cheaply on every call or, for what only the codec can tell (entries in
another order), with ``validate_codebooks=True``.
"""

from __future__ import annotations

import pytest
import torch

from utils import DISABLED, K, M, V, compressed, left_pad
from zip2zip_hf import LZWCodec, codebook_tensors


CODEC = LZWCodec(V, K, M, DISABLED)


def batch(lengths=(90, 50)):
    ids, mask = left_pad([compressed(seed, n) for seed, n in zip((21, 22), lengths)])
    return ids, mask, codebook_tensors(CODEC, ids, mask)


def loss(model, ids, mask, codebooks, **kwargs):
    with torch.no_grad():
        return model(
            input_ids=ids, attention_mask=mask, labels=ids, codebooks=codebooks, use_cache=False, **kwargs
        ).loss


def test_right_codebooks_pass_every_check_and_give_the_loss_without_them(model):
    ids, mask, codebooks = batch()
    expected = loss(model, ids, mask, None)
    torch.testing.assert_close(loss(model, ids, mask, codebooks, validate_codebooks=True), expected)


def replaced(key, edit):
    def corrupt(codebooks):
        tensor = codebooks[key].clone()
        edit(tensor)
        return {**codebooks, key: tensor}

    return corrupt


def hyper_position(ids):
    """The first (row, position) of a hypertoken in row 0."""
    return 0, int(torch.nonzero(ids[0] >= V)[0])


CHEAP = {
    "negative entry id": (replaced("entries", lambda t: t[0, 0].__setitem__(0, -3)), r"\['entries'\]\[0, 0, 0\] = -3"),
    "entry id past V": (replaced("entries", lambda t: t[0, 1].__setitem__(0, 10**6)), r"= 1000000 is outside"),
    "length past M": (
        replaced("lengths", lambda t: t[0].__setitem__(-1, M + 3)),
        rf"\['lengths'\]\[0, \d+\] = {M + 3}",
    ),
    "provisional length 99": (replaced("provisional_lengths", lambda t: t[1].__setitem__(-1, 99)), "= 99 is outside"),
    "legal 10**6": (replaced("legal", lambda t: t[0].__setitem__(5, 10**6)), r"\['legal'\]\[0, 5\] = 1000000"),
    "entry length past M": (replaced("entry_lengths", lambda t: t[1].__setitem__(0, M + 1)), "is outside"),
    "extending id past V": (replaced("extending", lambda t: t[0, 3].__setitem__(0, V)), rf"= {V} is outside \[-1,"),
    "extending without a column": (
        lambda c: {**c, "extending": c["extending"][..., :0]},
        r"codebooks\['extending'\] has shape",
    ),
    "float tensors": (
        lambda c: {**c, "legal": c["legal"].float()},
        "must be an integer tensor .* got a torch.float32",
    ),
    "numpy arrays": (lambda c: {**c, "entries": c["entries"].numpy()}, "must be an integer tensor .* got ndarray"),
    "lists": (lambda c: {**c, "lengths": c["lengths"].tolist()}, "must be an integer tensor .* got list"),
    "a key missing": (lambda c: {k: v for k, v in c.items() if k != "entries"}, "what codebook_tensors"),
}


@pytest.mark.parametrize("corruption", CHEAP)
def test_corrupt_codebooks_are_errors_naming_what_is_wrong(model, corruption):
    ids, mask, codebooks = batch()
    corrupt, message = CHEAP[corruption]
    with pytest.raises(ValueError, match=message):
        loss(model, ids, mask, corrupt(codebooks))


def test_a_shorter_entry_than_the_id_stands_for_is_caught_cheaply(model):
    ids, mask, codebooks = batch()
    b, t = hyper_position(ids)
    corrupt = replaced("entry_lengths", lambda e: e[b].__setitem__(int(ids[b, t]) - V, 1))(codebooks)
    with pytest.raises(ValueError, match=rf"codebooks\['lengths'\]\[{b}, {t}\] = \d+ but input_ids\[{b}, {t}\]"):
        loss(model, ids, mask, corrupt)


def test_another_rows_codebooks_of_the_same_shape_are_refused(model):
    """Two rows of one length, no padding: each row's codebooks swapped for the other's."""
    ids, mask, codebooks = batch(lengths=(60, 60))
    width = min(int((mask[0] > 0).sum()), int((mask[1] > 0).sum()))
    ids, mask = ids[:, -width:], mask[:, -width:]
    codebooks = codebook_tensors(CODEC, ids, mask)
    swapped = {key: value.flip(0) for key, value in codebooks.items()}
    with pytest.raises(ValueError, match="not these ids'|not a legal id"):
        loss(model, ids, mask, swapped)


def test_a_child_left_out_of_extending_is_found_by_the_full_check(model):
    ids, mask, codebooks = batch()
    b, t, c = (int(i) for i in torch.nonzero(codebooks["extending"] >= 0)[0])
    corrupt = replaced("extending", lambda e: e[b, t].__setitem__(c, -1))(codebooks)
    loss(model, ids, mask, corrupt)  # the cheap checks cannot know: the logits allow one more id there
    with pytest.raises(ValueError, match=rf"codebooks\['extending'\]\[{b}, {t}, {c}\] = -1; these ids give"):
        loss(model, ids, mask, corrupt, validate_codebooks=True)


def test_reordered_entries_are_found_by_the_full_check(model):
    ids, mask, codebooks = batch()
    order = torch.arange(codebooks["entries"].shape[1])
    order[[0, 1]] = order[[1, 0]]
    reordered = {**codebooks, "entries": codebooks["entries"][:, order]}
    assert not torch.equal(reordered["entries"], codebooks["entries"])
    with pytest.raises(ValueError, match=r"codebooks\['entries'\]\[0, 0, \d\] = \d+; these ids give \d+"):
        loss(model, ids, mask, reordered, validate_codebooks=True)


def test_the_collator_makes_what_the_full_check_accepts(text_model, text_tok):
    from zip2zip_hf.finetuning.data import Zip2ZipDataCollator

    texts = ["def f(x):\n    return x + x + x\n" * 4, "the cat sat on the mat, the cat sat on the hat"]
    collated = Zip2ZipDataCollator(text_tok)([{"input_ids": text_tok(text)["input_ids"]} for text in texts])
    codebooks = collated.pop("codebooks")
    with torch.no_grad():
        checked = text_model(**collated, codebooks=codebooks, validate_codebooks=True, use_cache=False).loss
        plain = text_model(**collated, use_cache=False).loss
    torch.testing.assert_close(checked, plain)
