"""generate(): every decoding mode over per-row codebooks, base-id outputs, forced decoding."""

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from utils import (
    CODE_CONTINUATION,
    CODE_PROMPT,
    DISABLED,
    PAD,
    STDLIB,
    K,
    M,
    V,
    assert_same_logits,
    compressed,
    forced_text_generation,
    left_pad,
)
from zip2zip_hf import LZWCodec
from zip2zip_hf.evaluation.forced_decoding import ForcedContinuationLogitsProcessor, canonical_continuation
from zip2zip_hf.generation_zip2zip import Zip2ZipGenerateBeamOutput, Zip2ZipGenerateOutput


CODEC = LZWCodec(V, K, M, DISABLED)
EOS = 1


def generate(model, ids, mask=None, **kwargs):
    kwargs.setdefault("max_new_tokens", 12)
    kwargs.setdefault("do_sample", False)
    return model.generate(input_ids=ids, attention_mask=mask, pad_token_id=PAD, eos_token_id=None, **kwargs)


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
    assert isinstance(out, Zip2ZipGenerateOutput)
    assert out.codebooks[0] == codebook.to_dict() == CODEC.encode(base_ids)[1].to_dict()


def test_beam_output_is_typed_and_carries_codebooks(model):
    row = compressed(27, 45)
    out = generate(model, torch.tensor([row]), num_beams=2, return_hypertokens=True, return_dict_in_generate=True)
    assert isinstance(out, Zip2ZipGenerateBeamOutput)
    assert out.codebooks[0] == CODEC.decode(out.sequences[0].tolist())[1].to_dict()


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
    out = generate(
        model,
        ids,
        mask,
        do_sample=True,
        top_k=50,
        top_p=0.9,
        temperature=1.5,
        num_return_sequences=3,
        return_hypertokens=True,
        return_dict_in_generate=True,
        max_new_tokens=15,
    )
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
    out = generate(
        model,
        torch.tensor([prompt]),
        logits_processor=LogitsProcessorList([processor]),
        max_new_tokens=len(continuation),
    )
    assert CODEC.decode(prompt)[0] + out[0, len(prompt) :].tolist() == text


def test_canonical_continuation_is_what_encode_writes():
    text = CODEC.decode(compressed(31, 200))[0]
    codes = CODEC.encode(text)[0]
    assert canonical_continuation(CODEC, [], text) == codes
    for cut in (1, 17, 40, len(codes) - 1):
        prompt_text = CODEC.decode(codes[:cut])[0]
        assert canonical_continuation(CODEC, codes[:cut], text[len(prompt_text) :]) == codes[cut:]
    runs = LZWCodec(50, 16, 4, [0])
    assert canonical_continuation(runs, [], [5] * 6) == [5, 50, 51] == runs.encode([5] * 6)[0]  # KwKwK twice


def test_forced_continuation_processor_reproduces_the_text_and_refuses_illegal_ids(model):
    text = CODEC.decode(compressed(30, 160))[0]
    codes = CODEC.encode(text)[0]
    prompt = codes[:30]
    processor = ForcedContinuationLogitsProcessor(CODEC, text[len(CODEC.decode(prompt)[0]) :])
    out = generate(
        model,
        torch.tensor([prompt]),
        logits_processor=LogitsProcessorList([processor]),
        max_new_tokens=len(codes) - 30,
        return_hypertokens=True,
    )
    assert out[0, 30:].tolist() == codes[30:] == processor.codes[0]

    class Illegal(ForcedContinuationLogitsProcessor):  # pretends a not-yet-installed entry is canonical
        def __call__(self, input_ids, scores):
            if self.prompt_length is None:
                super().__call__(input_ids, scores)
                self.codes = [[V + K - 1]]
            return super().__call__(input_ids, scores)

    with pytest.raises(ValueError, match=f"forced id {V + K - 1} is not legal"):
        generate(model, torch.tensor([prompt]), logits_processor=LogitsProcessorList([Illegal(CODEC, [5, 6])]))


# ---------------------------------------------------------------------- stopping, processors, legality


class ForceEosAt(LogitsProcessor):
    """Row b writes EOS at step ``steps[b]`` (and whatever the model likes before)."""

    def __init__(self, steps: list[int], prompt_length: int):
        self.steps, self.prompt_length = steps, prompt_length

    def __call__(self, input_ids, scores):
        step = input_ids.shape[1] - self.prompt_length
        for b, k in enumerate(self.steps):
            if step == k:
                scores[b] = float("-inf")
                scores[b, EOS] = 0
            else:
                scores[b, EOS] = float("-inf")
        return scores


def test_eos_stops_rows_and_pads_them(model):
    rows = [compressed(32, 50), compressed(33, 36)]
    ids, mask = left_pad(rows)
    steps = [3, 7]
    processor = ForceEosAt(steps, ids.shape[1])
    kwargs = dict(eos_token_id=EOS, max_new_tokens=20, logits_processor=LogitsProcessorList([processor]))
    kwargs.update(input_ids=ids, attention_mask=mask, pad_token_id=PAD, do_sample=False)
    raw = model.generate(return_hypertokens=True, **kwargs)
    out = model.generate(**kwargs)
    assert raw.shape[1] == ids.shape[1] + max(steps) + 1  # stopped when the last row wrote EOS
    assert torch.equal(out[:, : ids.shape[1]], ids)
    for b, (row, k) in enumerate(zip(rows, steps, strict=True)):
        generated = raw[b, ids.shape[1] :].tolist()
        assert generated[k] == EOS and EOS not in generated[:k]
        assert all(i == PAD for i in generated[k + 1 :])
        written, _ = CODEC.decode(row + generated[: k + 1])
        expected = written[len(CODEC.decode(row)[0]) :]
        tail = out[b, ids.shape[1] :].tolist()
        assert tail[: len(expected)] == expected and expected[-1] == EOS
        assert all(i == PAD for i in tail[len(expected) :])


class RecordScores(LogitsProcessor):
    def __init__(self):
        self.widths, self.finite = [], []

    def __call__(self, input_ids, scores):
        self.widths.append(scores.shape[-1])
        self.finite.append(torch.isfinite(scores).clone())
        return scores


@pytest.mark.parametrize("num_beams", [1, 2])
def test_logits_processors_see_the_widened_vocabulary(model, num_beams):
    ids = torch.tensor([compressed(34, 40)])
    recorder = RecordScores()
    generate(model, ids, logits_processor=LogitsProcessorList([recorder]), max_new_tokens=6, num_beams=num_beams)
    assert recorder.widths and set(recorder.widths) == {V + K}
    assert any(f[:, V:].any() for f in recorder.finite), "hyper ids should be legal somewhere"


def test_sampled_ids_are_always_legal_for_their_row(model):
    """Hot, untruncated sampling over a left-padded batch: every raw row must decode with the codec."""
    rows = [compressed(35, 60), compressed(36, 20), compressed(37, 44)]
    ids, mask = left_pad(rows)
    torch.manual_seed(1)
    out = generate(
        model,
        ids,
        mask,
        do_sample=True,
        temperature=3.0,
        top_k=0,
        top_p=1.0,
        num_return_sequences=4,
        max_new_tokens=25,
        return_hypertokens=True,
        return_dict_in_generate=True,
        output_scores=True,
    )
    hyper_written = 0
    for b, row in enumerate(out.sequences.tolist()):
        generated = row[ids.shape[1] :]
        stream = CODEC.stream()
        stream.feed(rows[b // 4])
        for step, code in enumerate(generated):
            assert code < V or code < V + stream.num_legal_hyper, f"row {b} step {step}: illegal id {code}"
            assert torch.isfinite(out.scores[step][b, code])
            stream.feed(code)
            hyper_written += code >= V
        assert out.codebooks[b] == stream.codebook.to_dict()
    assert hyper_written > 0


def _extends(stream, previous: int, code: int) -> bool:
    """Whether ``code``'s first base id extends ``previous``'s phrase to an installed entry (what
    greedy LZW would have written instead: ``code`` is not canonical after ``previous``)."""
    first = stream.expand(code)[0]
    return previous * V + first in stream.codebook._lookup


class TemptedByIdsThatExtend(LogitsProcessor):
    """Adds 100 to every legal id whose first base id extends the id before it: greedy decoding then
    writes one wherever the model's logits leave one finite. Counts the steps that had any."""

    def __init__(self, prompt_length: int):
        self.prompt_length, self.tempted = prompt_length, 0

    def __call__(self, input_ids, scores):
        scores = scores.clone()
        for b, row in enumerate(input_ids.tolist()):
            stream = CODEC.stream()
            stream.feed([i for i in row[: self.prompt_length] if i != PAD] + row[self.prompt_length :])
            legal = range(V + stream.num_legal_hyper)
            extending = [code for code in legal if _extends(stream, row[-1], code)]
            if len(row) > self.prompt_length and extending:  # after the first written id
                self.tempted += 1
                scores[b, extending] += 100.0
        return scores


@pytest.mark.parametrize("on_device", [False, True], ids=["python-streams", "device-codebooks"])
def test_written_ids_are_canonical_after_the_first(model, on_device, monkeypatch):
    """After the first id (which may go on inside the prompt's last phrase) no written id starts with
    a base id that extends the id before it, even where a processor pushes such ids to the top."""
    monkeypatch.setattr(model, "codebooks_on_device", on_device)
    rows = [compressed(40, 60), compressed(41, 30)]
    ids, mask = left_pad(rows)
    tempt = TemptedByIdsThatExtend(ids.shape[1])
    processors = LogitsProcessorList([tempt])
    out = generate(model, ids, mask, logits_processor=processors, max_new_tokens=30, return_hypertokens=True)
    assert tempt.tempted > 20
    for b, row in enumerate(out.tolist()):
        stream = CODEC.stream()
        stream.feed(rows[b])
        previous = rows[b][-1]
        for step, code in enumerate(row[ids.shape[1] :]):
            assert step == 0 or not _extends(stream, previous, code), f"row {b} step {step}: {code} extends {previous}"
            stream.feed(code)
            previous = code
    monkeypatch.setattr(model.config, "canonical_ids_only", False)  # the same run without the rule gives in
    unruled = generate(model, ids, mask, logits_processor=processors, max_new_tokens=30, return_hypertokens=True)
    assert not torch.equal(unruled, out)


def test_the_prompts_last_phrase_stays_open_for_the_first_id(model):
    """A prompt that ends with a phrase that has children: a plain forward rules out the ids that
    extend it, the first step of `generate` does not (the text may go on inside that phrase)."""
    codes, codebook = CODEC.encode([5, 6, 7, 5, 6, 7, 5, 6, 5, 6])  # ends with [5, 6], which [5, 6, 7] extends
    stream = CODEC.stream()
    stream.feed(codes)
    assert _extends(stream, codes[-1], 7)
    with torch.no_grad():
        plain = model(input_ids=torch.tensor([codes])).logits[0, -1]
    assert plain[7] == float("-inf")
    seen = []

    class Spy(LogitsProcessor):
        def __call__(self, input_ids, scores):
            seen.append(scores.clone())
            return scores

    generate(model, torch.tensor([codes]), logits_processor=LogitsProcessorList([Spy()]), max_new_tokens=3)
    assert torch.isfinite(seen[0][0, 7])
    ids = torch.tensor([codes])
    marked = torch.zeros_like(ids, dtype=torch.bool)
    marked[0, -1] = True
    with torch.no_grad():
        by_index = model(input_ids=ids, open_phrase_at=-1).logits[0]
        by_mask = model(input_ids=ids, open_phrase_at=marked).logits[0]
    assert torch.equal(by_index, by_mask) and torch.isfinite(by_index[-1, 7])
    assert_same_logits(by_index[-1:], seen[0])  # what generate's first step saw
    with pytest.raises(ValueError, match="open_phrase_at must be an index"):
        model(input_ids=ids, open_phrase_at=len(codes))
    with pytest.raises(ValueError, match="bool tensor shaped like input_ids"):
        model(input_ids=ids, open_phrase_at=marked.long())


# ---------------------------------------------------------------------- with a real tokenizer: streamers, stop strings


def test_forced_text_generation_writes_hypertokens_and_the_exact_text(text_model, text_tok):
    inputs, raw, processor = forced_text_generation(
        text_model, text_tok, CODE_PROMPT, CODE_CONTINUATION, return_hypertokens=True
    )
    n = inputs["input_ids"].shape[1]
    generated = raw[0, n:].tolist()
    assert sum(i >= text_tok.initial_vocab_size for i in generated) > 10
    assert len(generated) < 0.8 * len(text_tok.base_ids([CODE_CONTINUATION], add_special_tokens=False)[0])
    assert text_tok.decode(raw[0]) == CODE_PROMPT + CODE_CONTINUATION
    assert set(processor.widths) == {text_tok.initial_vocab_size + text_tok.max_codebook_size}


@pytest.mark.parametrize("skip_prompt", [True, False])
@pytest.mark.parametrize("eos", [False, True])
def test_text_streamer_prints_the_decoded_text(text_model, text_tok, capsys, skip_prompt, eos):
    from transformers import TextStreamer

    capsys.readouterr()
    streamer = TextStreamer(text_tok, skip_prompt=skip_prompt, skip_special_tokens=True)
    inputs, out, _ = forced_text_generation(
        text_model, text_tok, CODE_PROMPT, CODE_CONTINUATION, eos=eos, streamer=streamer
    )
    printed = capsys.readouterr().out
    n = inputs["input_ids"].shape[1]
    generated = text_tok.decode(out[0, n:], skip_special_tokens=True)
    assert generated == CODE_CONTINUATION
    if eos:
        assert out[0, -1] == text_tok.eos_token_id
    expected = generated if skip_prompt else text_tok.decode(out[0], skip_special_tokens=True)
    assert printed == expected + "\n"  # TextStreamer ends the stream with a newline of its own


@pytest.mark.parametrize("skip_prompt", [True, False])
def test_text_iterator_streamer_yields_the_decoded_text(text_model, text_tok, skip_prompt):
    from threading import Thread

    from transformers import TextIteratorStreamer

    streamer = TextIteratorStreamer(text_tok, skip_prompt=skip_prompt, timeout=60)
    result = {}
    thread = Thread(
        target=lambda: result.update(
            out=forced_text_generation(text_model, text_tok, CODE_PROMPT, CODE_CONTINUATION, streamer=streamer)[1]
        )
    )
    thread.start()
    text = "".join(streamer)
    thread.join(timeout=60)
    assert text == (CODE_CONTINUATION if skip_prompt else CODE_PROMPT + CODE_CONTINUATION)
    assert text_tok.decode(result["out"][0]).endswith(text)


def test_streamer_refuses_batches(text_model, text_tok):
    from transformers import TextStreamer

    inputs = text_tok([CODE_PROMPT, "x = 1\n"], return_tensors="pt", padding=True)
    with pytest.raises(ValueError, match="batch size 1"):
        text_model.generate(**inputs, max_new_tokens=2, streamer=TextStreamer(text_tok))


@pytest.mark.parametrize("stop", ["width * depth", "volume(", "n 2 * (w"])
def test_stop_strings_stop_right_after_the_string_appears(text_model, text_tok, stop):
    inputs, raw, _ = forced_text_generation(
        text_model,
        text_tok,
        CODE_PROMPT,
        CODE_CONTINUATION,
        stop_strings=[stop, "never in the text"],
        tokenizer=text_tok,
        return_hypertokens=True,
    )
    n = inputs["input_ids"].shape[1]
    assert raw.shape[1] > n + 1
    text = text_tok.decode(raw[0])[len(CODE_PROMPT) :]
    before = text_tok.decode(raw[0, :-1])[len(CODE_PROMPT) :]
    assert stop in text and stop not in before
    assert CODE_CONTINUATION.startswith(text)


def test_stop_strings_in_a_batch_stop_each_row(text_model, text_tok):
    prompts = [CODE_PROMPT, "# helpers\n" + CODE_PROMPT]
    inputs = text_tok(prompts, return_tensors="pt", padding=True)
    base_ids = text_tok.base_ids([CODE_CONTINUATION], add_special_tokens=False)[0]
    processor = ForcedContinuationLogitsProcessor(text_tok.codec, base_ids, pad_token_id=text_tok.pad_token_id)
    stop = "volume("
    out = text_model.generate(
        **inputs,
        logits_processor=LogitsProcessorList([processor]),
        do_sample=False,
        max_new_tokens=200,
        stop_strings=stop,
        tokenizer=text_tok,
    )
    n = inputs["input_ids"].shape[1]
    for b in range(2):
        text = text_tok.decode(out[b, n:], skip_special_tokens=True)
        assert stop in text and CODE_CONTINUATION.startswith(text)
        assert len(text) < CODE_CONTINUATION.index(stop) + len(stop) + 12  # at most the step that completed it


def test_stop_strings_criterion_follows_reordered_and_repeated_rows(text_tok):
    """Beam search reorders and duplicates rows between calls: the criterion must agree with decoding each
    row from scratch (true exactly when a stop string appears in the text of the last step)."""
    from zip2zip_hf.generation_zip2zip import StopStringsOnText

    codec = text_tok.codec
    prompt = text_tok(CODE_PROMPT)["input_ids"]
    texts = [CODE_CONTINUATION, CODE_CONTINUATION.replace("width", "w"), CODE_CONTINUATION[::-1]]
    texts_ids = text_tok.base_ids(texts, add_special_tokens=False)
    streams = [canonical_continuation(codec, prompt, ids) for ids in texts_ids]
    stops = ["* depth", "return w", "(w", "\n\n"]
    criterion = StopStringsOnText(stops, text_tok, codec)
    g = torch.Generator().manual_seed(0)
    rows = [list(prompt) for _ in range(4)]
    picks = [0, 1, 2, 0]
    for step in range(40):
        order = torch.randint(0, 4, (4,), generator=g).tolist() if step % 3 == 2 else [0, 1, 2, 3]
        rows, picks = [list(rows[i]) for i in order], [picks[i] for i in order]
        for b in range(4):
            rows[b].append(streams[picks[b]][step])
        done = criterion(torch.tensor(rows), None).tolist()
        for b, row in enumerate(rows):
            now = text_tok.decode(row)[len(CODE_PROMPT) :]
            before = text_tok.decode(row[:-1])[len(CODE_PROMPT) :]
            new = any(s in now and s not in before for s in stops)
            assert done[b] == new or (not new and any(s in before for s in stops)), (step, b, now[-30:])


# ---------------------------------------------------------------------- the real SmolLM2-135M-Instruct


@pytest.fixture(scope="module")
def smol_model_and_tok(smollm2_dir):
    """SmolLM2-135M-Instruct wrapped fresh (untrained encoders), with its Zip2ZipTokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from zip2zip_hf import Zip2ZipForCausalLM, Zip2ZipTokenizer

    tok = Zip2ZipTokenizer.from_base(AutoTokenizer.from_pretrained(smollm2_dir))
    base = AutoModelForCausalLM.from_pretrained(smollm2_dir).eval()
    return Zip2ZipForCausalLM.from_base(base, tok).eval(), tok


def stdlib_function(name: str, function: str) -> str:

    source = (STDLIB / name).read_text(encoding="utf-8")
    start = source.index(f"def {function}(")
    return source[start : source.index("\ndef ", start + 1) + 1]


@pytest.mark.real_model
def test_real_forced_canonical_continuation_reproduces_the_text(smol_model_and_tok):
    model, tok = smol_model_and_tok
    text = stdlib_function("textwrap.py", "dedent")
    prompt, continuation = text[:300], text[300:700]
    inputs, raw, processor = forced_text_generation(model, tok, prompt, continuation, return_hypertokens=True)
    n = inputs["input_ids"].shape[1]
    generated = raw[0, n:].tolist()
    assert tok.decode(raw[0]) == prompt + continuation
    assert len(generated) < len(tok.base_ids([continuation], add_special_tokens=False)[0])
    assert sum(i >= tok.initial_vocab_size for i in generated) >= 5  # hypertokens of prompt and continuation
    assert set(processor.widths) == {tok.initial_vocab_size + tok.max_codebook_size}


@pytest.mark.real_model
def test_real_greedy_equals_hand_written_loop(smol_model_and_tok):
    model, tok = smol_model_and_tok
    prompt = stdlib_function("textwrap.py", "dedent")[:400]
    inputs = tok(prompt, return_tensors="pt")
    assert inputs["input_ids"].max() >= tok.initial_vocab_size
    out = model.generate(**inputs, max_new_tokens=16, do_sample=False, return_hypertokens=True)
    with torch.no_grad():
        by_hand = greedy_by_hand(model, inputs["input_ids"][0].tolist(), 16)
    assert out[0, inputs["input_ids"].shape[1] :].tolist() == by_hand


@pytest.mark.slow
@pytest.mark.parametrize("num_beams", [1, 2])
def test_one_model_generates_from_many_threads(model, monkeypatch, num_beams):
    """A server calls one model from several threads: no call's state may live on the module (nor
    on its generation config, which a static-cache call must leave as it found it)."""
    import sys
    from concurrent.futures import ThreadPoolExecutor

    rows = [compressed(seed, 12 + 3 * seed) for seed in range(4)]
    settings = [{}, {"cache_implementation": "static"}]
    expected = {
        (i, j): generate(model, torch.tensor([row]), num_beams=num_beams, **setting).tolist()
        for i, row in enumerate(rows)
        for j, setting in enumerate(settings)
    }
    monkeypatch.setattr(model.generation_config, "cache_implementation", "static")
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible
    try:
        with ThreadPoolExecutor(4) as pool:
            calls = [(i, j) for _ in range(3) for i in range(len(rows)) for j in range(len(settings))]
            futures = {
                call: pool.submit(
                    generate, model, torch.tensor([rows[call[0]]]), num_beams=num_beams, **settings[call[1]]
                )
                for call in calls
            }
            results = {call: future.result().tolist() for call, future in futures.items()}
    finally:
        sys.setswitchinterval(interval)
    assert results == {call: expected[call] for call in results}
    assert model.generation_config.cache_implementation == "static"
