"""generate(): every decoding mode over per-row codebooks, base-id outputs, forced decoding."""

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from test_modeling import DISABLED, K, M, PAD, V, compressed, left_pad, tiny_base, wrap
from zip2zip_hf import LZWCodec


CODEC = LZWCodec(V, K, M, DISABLED)
EOS = 1


def generate(model, ids, mask=None, **kwargs):
    kwargs.setdefault("max_new_tokens", 12)
    kwargs.setdefault("do_sample", False)
    return model.generate(input_ids=ids, attention_mask=mask, pad_token_id=PAD, eos_token_id=None, **kwargs)


@pytest.fixture(scope="module")
def model():
    return wrap(tiny_base("llama"))


def greedy_by_hand(model, row: list[int], steps: int) -> list[int]:
    out = model(input_ids=torch.tensor([row]), use_cache=True)
    generated = []
    for _ in range(steps):
        next_id = int(out.logits[0, -1].argmax())
        generated.append(next_id)
        out = model(input_ids=torch.tensor([[next_id]]), past_key_values=out.past_key_values)
    return generated


def test_greedy_equals_hand_written_loop_and_codebook_is_canonical(model):
    row = compressed(20, 60)
    out = generate(model, torch.tensor([row]), return_hypertokens=True, return_dict_in_generate=True)
    generated = out.sequences[0, len(row) :].tolist()
    with torch.no_grad():
        assert generated == greedy_by_hand(model, row, 12)
    assert any(i >= V for i in generated), "the random model should write hypertokens"
    base_ids, codebook = CODEC.decode(row + generated)
    assert out.codebooks[0] == codebook.to_dict() == CODEC.encode(base_ids)[1].to_dict()


def test_output_is_prompt_then_base_ids(model):
    rows = [compressed(21, 50), compressed(22, 30)]
    ids, mask = left_pad(rows)
    raw = generate(model, ids, mask, return_hypertokens=True)
    out = generate(model, ids, mask)
    assert torch.equal(out[:, : ids.shape[1]], ids)
    for b in range(len(rows)):
        prompt_base, _ = CODEC.decode(rows[b])
        full_base, _ = CODEC.decode(rows[b] + raw[b, ids.shape[1] :].tolist())
        tail = out[b, ids.shape[1] :].tolist()
        assert tail[: len(full_base) - len(prompt_base)] == full_base[len(prompt_base) :]
        assert all(i == PAD for i in tail[len(full_base) - len(prompt_base) :])
        assert max(tail) < V


def test_without_cache_equals_with_cache(model):
    ids = torch.tensor([compressed(23, 40)])
    cached = generate(model, ids, return_hypertokens=True)
    uncached = generate(model, ids, use_cache=False, return_hypertokens=True)
    assert torch.equal(cached, uncached)


def test_batch_equals_rows_alone(model):
    rows = [compressed(24, 70), compressed(25, 35), compressed(26, 52)]
    ids, mask = left_pad(rows)
    batch = generate(model, ids, mask, return_hypertokens=True)
    for b, row in enumerate(rows):
        alone = generate(model, torch.tensor([row]), return_hypertokens=True)
        assert batch[b, ids.shape[1] :].tolist() == alone[0, len(row) :].tolist()


def test_one_beam_equals_greedy_and_beams_stay_legal(model):
    ids = torch.tensor([compressed(27, 45)])
    greedy = generate(model, ids, return_hypertokens=True)
    one_beam = generate(model, ids, num_beams=1, return_hypertokens=True)
    assert torch.equal(greedy, one_beam)
    beams = generate(model, ids, num_beams=3, num_return_sequences=3, return_hypertokens=True)
    for row in beams.tolist():
        CODEC.decode(row)  # raises on any id that was not legal where it was written


def test_sampled_return_sequences_have_their_own_codebooks(model):
    rows = [compressed(28, 40), compressed(29, 25)]
    ids, mask = left_pad(rows)
    torch.manual_seed(0)
    out = generate(model, ids, mask, do_sample=True, top_k=50, top_p=0.9, temperature=1.5, num_return_sequences=3,
                   return_hypertokens=True, return_dict_in_generate=True, max_new_tokens=15)
    assert len(out.sequences) == 6
    for b, row in enumerate(out.sequences.tolist()):
        prompt = rows[b // 3]
        base_ids, codebook = CODEC.decode(prompt + row[ids.shape[1] :])
        assert out.codebooks[b] == codebook.to_dict()
    assert len({tuple(r) for r in out.sequences.tolist()}) > 2


class OnlyAllow(LogitsProcessor):
    """Forces the next id of each step to be the next code of a fixed continuation."""

    def __init__(self, continuation: list[int], prompt_length: int):
        self.continuation, self.prompt_length = continuation, prompt_length

    def __call__(self, input_ids, scores):
        step = input_ids.shape[1] - self.prompt_length
        forced = torch.full_like(scores, float("-inf"))
        forced[:, self.continuation[min(step, len(self.continuation) - 1)]] = 0
        return forced


def test_forced_canonical_continuation_reproduces_the_text(model):
    text = CODEC.decode(compressed(30, 160))[0]  # base ids of a repetitive text
    codes = CODEC.encode(text)[0]
    prompt, continuation = codes[:30], codes[30:]
    processor = OnlyAllow(continuation, len(prompt))
    out = generate(model, torch.tensor([prompt]), logits_processor=LogitsProcessorList([processor]),
                   max_new_tokens=len(continuation))
    assert CODEC.decode(prompt)[0] + out[0, len(prompt) :].tolist() == text
