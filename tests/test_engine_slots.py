"""`SlotCodebooks`, the engine-agnostic slot core, driven by a fake continuous-batching engine.

The fake engine keeps what a real one keeps: requests in stable slots, a waiting queue, a "KV
cache" per request (here the input embeddings and positions of its computed ids, over which the
base model's decoder recomputes the last hidden state), chunked prefill, padding rows, rows that
move from step to step, preemption (by recomputation, or with the KV kept) and a prefix cache.
Its greedy ids must equal `generate` for each request alone, under both codebook stores (the
Python streams and the device tensors), and its logits the model's teacher-forced logits.
"""

from __future__ import annotations

import random
from collections import Counter, deque
from dataclasses import dataclass, field

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from utils import K, V, assert_same_logits, codebooks_on_device, compressed, generate_ids, tiny_base, wrap
from zip2zip_hf.engines import SlotCodebooks
from zip2zip_hf.evaluation.op_counts import count_ops


@dataclass(eq=False)  # a request is itself: two with the same prompt are two requests (and hold tensors)
class Request:
    prompt: list[int]
    max_new_tokens: int
    outputs: list[int] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)  # one per sampled id
    slot: int | None = None
    embeds: list[torch.Tensor] = field(default_factory=list)  # the "KV cache": one per computed id
    positions: list[int] = field(default_factory=list)

    @property
    def ids(self) -> list[int]:
        return self.prompt + self.outputs

    @property
    def computed(self) -> int:
        return len(self.embeds)


class FakeEngine:
    """A continuous-batching engine in miniature over `SlotCodebooks` (see the module docstring)."""

    def __init__(
        self,
        model,
        max_num_seqs: int,
        chunk: int = 4,
        padding: int = 2,
        seed: int = 0,
        prefix_cache=False,
        host_reads_free=False,
    ):
        self.decoder = model.get_decoder()
        self.core = SlotCodebooks.from_model(model, max_num_seqs, host_reads_free=host_reads_free)
        self.rng = random.Random(seed)
        self.chunk, self.padding, self.prefix_cache = chunk, padding, prefix_cache
        self.free = list(range(max_num_seqs))
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.cached: list[tuple[list[int], list[torch.Tensor], list[int]]] = []  # the prefix cache
        self.slots_used: dict[int, set[int]] = {}  # id(request) -> the slots it sat in
        self.hits: list[int] = []  # ids taken from the prefix cache at each admission
        self.moved = 0  # requests whose first row index changed between two steps
        self._first_row: dict[int, int] = {}

    def submit(self, request: Request) -> None:
        self.waiting.append(request)

    def preempt(self, request: Request, keep: int = 0) -> None:
        """Evict a running request, keeping the KV of its first ``keep`` computed ids (0: recompute)."""
        self._leave(request)
        del request.embeds[keep:], request.positions[keep:]
        self.waiting.appendleft(request)

    def _leave(self, request: Request) -> None:
        self.core.remove(request.slot)
        self.free.append(request.slot)
        request.slot = None
        self.running.remove(request)
        self.cached.append((request.ids[: request.computed], list(request.embeds), list(request.positions)))

    def _admit(self) -> None:
        while self.waiting and self.free:
            request = self.waiting.popleft()
            if self.prefix_cache:
                self._reuse_a_prefix(request)
            slot = self.free.pop(self.rng.randrange(len(self.free)))
            self.core.add(slot, request.ids, num_computed=request.computed, prompt_length=len(request.prompt))
            request.slot = slot
            self.slots_used.setdefault(id(request), set()).add(slot)
            self.running.append(request)

    def _reuse_a_prefix(self, request: Request) -> None:
        """Take the KV of the longest cached prefix of the request's ids (never the last id, which
        an engine always computes again)."""
        best = (request.computed, None)
        for ids, embeds, positions in self.cached:
            n = 0
            while n < min(len(ids), len(request.ids) - 1) and ids[n] == request.ids[n]:
                n += 1
            if n > best[0]:
                best = (n, (embeds[:n], positions[:n]))
        self.hits.append(best[0] - request.computed)
        if best[1] is not None:
            request.embeds, request.positions = list(best[1][0]), list(best[1][1])

    def step(self) -> None:
        self._admit()
        if not self.running:  # waiting for an arrival
            return
        scheduled = [(r, r.computed, min(self.chunk, len(r.ids) - r.computed)) for r in self.running]
        self.rng.shuffle(scheduled)  # the rows of a request move from step to step
        rows: list[tuple[Request, int] | None] = [(r, t) for r, start, n in scheduled for t in range(start, start + n)]
        for _ in range(self.rng.randint(0, self.padding)):
            rows.insert(self.rng.randint(0, len(rows)), None)
        slots = torch.tensor([-1 if row is None else row[0].slot for row in rows])
        ids = torch.tensor([self.rng.randrange(V + K) if row is None else row[0].ids[row[1]] for row in rows])
        most = max(Counter(slots[slots >= 0].tolist()).values())
        out = self.core.step(slots, ids, max_rows_per_slot=self.rng.choice([most, None]))
        self.core.raise_if_illegal()
        first_rows: dict[int, int] = {}
        sampled = []
        for i, row in enumerate(rows):
            if row is None:
                continue
            request, t = row
            first_rows.setdefault(id(request), i)
            request.embeds.append(out.inputs_embeds[i])
            request.positions.append(int(out.positions[i]))
            if t == len(request.ids) - 1:  # its last known id: the next one is sampled here
                sampled.append((request, i))
        self.moved += sum(self._first_row.get(key, i) != i for key, i in first_rows.items())
        self._first_row = first_rows
        if sampled:
            hidden = torch.stack([hidden_states(self.decoder, request)[-1] for request, _ in sampled])
            logits = self.core.logits(hidden, out, rows=torch.tensor([i for _, i in sampled]))
            for (request, _), row_logits in zip(sampled, logits):
                request.logits.append(row_logits)
                request.outputs.append(int(row_logits.argmax()))
                if len(request.outputs) == request.max_new_tokens:
                    self._leave(request)

    def run(self, requests, arrivals=None, preemptions=(), max_steps: int = 200) -> None:
        """Submit ``requests`` (those in ``arrivals``, ``{step: [indices]}``, at their step), preempt
        each ``(index, when, keep)`` of ``preemptions`` once, at the first step where ``when(request)``
        holds while it runs, keeping the KV of ``keep`` ids (``"all"``: all it computed), and step
        until every request is done."""
        arrivals, pending = arrivals or {}, list(preemptions)
        late = {i for group in arrivals.values() for i in group}
        for i, request in enumerate(requests):
            if i not in late:
                self.submit(request)
        for step in range(max_steps):
            for i in arrivals.get(step, ()):
                self.submit(requests[i])
            for entry in list(pending):
                i, when, keep = entry
                if requests[i] in self.running and when(requests[i]):
                    self.preempt(requests[i], requests[i].computed if keep == "all" else keep)
                    pending.remove(entry)
            if all(len(r.outputs) == r.max_new_tokens for r in requests):
                assert not pending, "a preemption never happened"
                return
            self.step()
        raise AssertionError("the fake engine did not finish")


def hidden_states(decoder, request: Request) -> torch.Tensor:
    """``(computed, D)`` the decoder's last hidden states over the request's computed ids (its KV)."""
    positions = torch.tensor([request.positions])
    with torch.no_grad():
        out = decoder(
            inputs_embeds=torch.stack(request.embeds)[None],
            position_ids=positions,
            attention_mask=torch.ones_like(positions),  # without one, base positions would read as packed sequences
            use_cache=False,
        )
    return out.last_hidden_state[0]


_REFERENCES: dict = {}


def generated_alone(model, prompt: list[int], n: int) -> list[int]:
    """`generate`'s greedy ids for ``prompt`` alone, the same under both codebook stores."""
    key = (id(model), tuple(prompt), n)
    if key not in _REFERENCES:
        found = []
        for on_device in (True, False):  # device tensors, Python streams
            with codebooks_on_device(model, on_device):
                out = generate_ids(model, torch.tensor([prompt]), torch.ones(1, len(prompt), dtype=torch.long), n)
            found.append(out[0, len(prompt) :].tolist())
        assert found[0] == found[1], "the two codebook stores disagree"
        _REFERENCES[key] = found[0]
    return _REFERENCES[key]


def teacher_forced(model, prompt: list[int], continuation: list[int]) -> torch.Tensor:
    """The model's logits after the prompt's last id and each continuation id, in one forward."""
    with torch.no_grad():
        out = model(input_ids=torch.tensor([prompt + continuation]), open_phrase_at=len(prompt) - 1, use_cache=False)
    return out.logits[0, len(prompt) - 1 :]


def assert_each_equals_generate(model, requests) -> None:
    for request in requests:
        assert request.outputs == generated_alone(model, request.prompt, request.max_new_tokens)
        expected = teacher_forced(model, request.prompt, request.outputs[:-1])
        assert_same_logits(torch.stack(request.logits), expected)


@pytest.fixture(scope="module")
def compressed_model():
    """Compressed positions and tied encoders: the other settings the logits and positions follow."""
    return wrap(tiny_base("llama"), position_mode="compressed", tie_encoders=True)


def mixed_requests(seed: int) -> list[Request]:
    lengths, steps = [50, 34, 66, 42, 58], [9, 5, 12, 7, 10]
    return [Request(compressed(seed + i, n), s) for i, (n, s) in enumerate(zip(lengths, steps))]


@pytest.mark.parametrize("settings", ["base", "compressed", "host reads free"])
def test_continuous_batching_writes_what_generate_writes_for_each_request(model, compressed_model, settings):
    """Five requests through three slots: some wait, two arrive mid-stream, each leaves when done
    and its slot goes to the next; prompts in chunks, padding rows, the rows in a new order each
    step. Each request's greedy ids and logits are those of `generate` for it alone (also where a
    step encodes and scores only the entries installed, as on a CPU)."""
    model = compressed_model if settings == "compressed" else model
    requests = mixed_requests(40)
    host_reads_free = settings == "host reads free"
    engine = FakeEngine(model, max_num_seqs=3, chunk=5, padding=3, seed=1, host_reads_free=host_reads_free)
    engine.run(requests, arrivals={3: [3], 8: [4]})
    assert_each_equals_generate(model, requests)
    assert any(i >= V for r in requests for i in r.outputs), "the requests should write hypertokens"
    assert any(i >= V for r in requests for i in r.prompt), "the prompts should hold hypertokens"
    assert len(set().union(*engine.slots_used.values())) == 3 and engine.moved > 0


@pytest.mark.parametrize("keep", ["recompute", "kv_kept", "prefix_cache", "mid_prompt"])
def test_a_preempted_request_resumes_as_if_never_preempted(model, keep):
    """A request evicted mid-stream and added again from all its ids (prompt and output so far),
    into whichever slot is free: its KV recomputed, kept, or taken from the prefix cache, or
    evicted while its prompt was still being read (half its KV kept)."""
    requests = mixed_requests(60)[:3]
    engine = FakeEngine(model, max_num_seqs=2, chunk=6, seed=2, prefix_cache=keep == "prefix_cache")
    if keep == "mid_prompt":
        preemptions = [(0, lambda r: r.computed >= 12, 8), (2, lambda r: r.computed >= 7, 3)]
    else:
        kept = "all" if keep == "kv_kept" else 0
        preemptions = [(0, lambda r: len(r.outputs) == 4, kept), (1, lambda r: len(r.outputs) == 2, kept)]
    engine.run(requests, preemptions=preemptions)
    assert_each_equals_generate(model, requests)
    if keep == "prefix_cache":
        assert max(engine.hits) > 10


# Prompts (and lengths of output) the random mixes draw from: `generate`'s answers are computed once.
POOL = [(compressed(200 + i, n), steps) for i, (n, steps) in enumerate(zip([44, 30, 56, 38], [7, 5, 8, 6]))]


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_random_request_mixes_write_what_generate_writes(model, data):
    """Any mix: how many slots, how long the prompt chunks, how much padding, when requests
    arrive, and one preemption (its KV dropped or kept)."""
    picks = data.draw(st.lists(st.integers(0, len(POOL) - 1), min_size=2, max_size=4))
    requests = [Request(*POOL[i]) for i in picks]
    engine = FakeEngine(
        model,
        max_num_seqs=data.draw(st.integers(1, 3)),
        chunk=data.draw(st.integers(1, 12)),
        padding=data.draw(st.integers(0, 3)),
        seed=data.draw(st.integers(0, 99)),
    )
    arrivals = {data.draw(st.integers(0, 15)): [len(requests) - 1]}
    victim, after = data.draw(st.integers(0, len(requests) - 1)), data.draw(st.integers(1, 4))
    keep = data.draw(st.sampled_from([0, "all"]))
    engine.run(requests, arrivals, [(victim, lambda r: len(r.outputs) == after, keep)])
    assert_each_equals_generate(model, requests)


def test_a_prefix_cache_hit_from_another_request(model):
    """A request whose prompt continues a finished request's ids reuses their KV (all but the
    last id of its prompt) and a slot rebuilt from them."""
    first = Request(compressed(70, 48), 8)
    engine = FakeEngine(model, max_num_seqs=2, chunk=7, seed=3, prefix_cache=True)
    engine.run([first])
    second = Request(first.prompt + first.outputs[:5], 6)
    engine.run([second])
    assert engine.hits[-1] == len(second.prompt) - 1
    assert_each_equals_generate(model, [first, second])


def feed(core: SlotCodebooks, slots: list[int], ids: list[int], **kwargs):
    return core.step(torch.tensor(slots), torch.tensor(ids), **kwargs)


def held(core: SlotCodebooks, slot: int) -> dict[str, torch.Tensor]:
    """A slot's state: its codebook row and its installed entries' vectors."""
    K = core.codec.max_codebook_size
    n = int(core.codebooks.num_installed[slot])
    return {
        "state": core.codebooks.state[slot],
        "table": core.codebooks.table[slot, :K],
        "input": core.input_table[slot, :n],
        "output": core.output_table[slot, :n],
    }


def assert_same_state(a: SlotCodebooks, b: SlotCodebooks, slots) -> None:
    for slot in slots:
        for name, value in held(a, slot).items():
            torch.testing.assert_close(held(b, slot)[name], value, msg=f"slot {slot}: {name}")


def rows_of(out, rows) -> dict[str, torch.Tensor]:
    selected = out.select(torch.tensor(list(rows)))
    return {name: getattr(selected, name) for name in selected.__dataclass_fields__}


def test_a_prompt_in_chunks_equals_the_prompt_whole(model):
    """Chunks of any sizes, interleaved with another request's rows, leave the slot as one chunk
    does, and give every row the same embedding, position and logits inputs."""
    prompt, other = compressed(80, 70), compressed(81, 40)
    whole, chunked = SlotCodebooks.from_model(model, 2), SlotCodebooks.from_model(model, 3)
    whole.add(1, prompt)
    chunked.add(2, prompt)
    chunked.add(0, other)
    expected = rows_of(feed(whole, [1] * len(prompt), prompt), range(len(prompt)))
    rng, start, other_start, parts = random.Random(4), 0, 0, []
    while start < len(prompt):
        chunk, others = prompt[start : start + rng.randint(1, 9)], other[other_start : other_start + 2]
        # A random interleaving of the two requests' rows: each one's own rows stay in order.
        chunk_at = sorted(rng.sample(range(len(chunk) + len(others)), len(chunk)))
        slots, ids, own, theirs = [], [], iter(chunk), iter(others)
        for i in range(len(chunk) + len(others)):
            slots.append(2 if i in chunk_at else 0)
            ids.append(next(own) if i in chunk_at else next(theirs))
        parts.append(rows_of(feed(chunked, slots, ids), chunk_at))
        start, other_start = start + len(chunk), other_start + len(others)
    for name, value in expected.items():
        if name != "slots":  # slot 1 there, 2 here
            torch.testing.assert_close(torch.cat([part[name] for part in parts]), value, msg=name)
    for key, value in held(whole, 1).items():
        torch.testing.assert_close(held(chunked, 2)[key], value, msg=key)


def test_padding_rows_change_nothing(model):
    """Padding rows (slot -1) with any ids, hyper ids and ids outside the id space included,
    change no slot, no row's output, and record no error."""
    prompts = [compressed(90, 40), compressed(91, 30)]
    plain, padded = SlotCodebooks.from_model(model, 2), SlotCodebooks.from_model(model, 2)
    for core in (plain, padded):
        for slot, prompt in enumerate(prompts):
            core.add(slot, prompt)
    rng = random.Random(5)
    for t in range(0, min(map(len, prompts)) - 2, 3):
        slots = [0, 0, 0, 1, 1, 1]
        ids = prompts[0][t : t + 3] + prompts[1][t : t + 3]
        junk = [rng.choice([0, 5, V, V + K - 1, V + K + 3, -7]) for _ in range(4)]
        where = sorted(rng.sample(range(10), 4))
        padded_slots, padded_ids, real_rows = list(slots), list(ids), list(range(6))
        for i, code in zip(where, junk):
            padded_slots.insert(i, -1)
            padded_ids.insert(i, code)
            real_rows = [r + (r >= i) for r in real_rows]
        expected = rows_of(feed(plain, slots, ids), range(6))
        got = rows_of(feed(padded, padded_slots, padded_ids), real_rows)
        for name, value in expected.items():
            torch.testing.assert_close(got[name], value, msg=name)
    padded.raise_if_illegal()
    assert_same_state(plain, padded, [0, 1])


def test_every_rows_logits_equal_the_teacher_forced_logits(model):
    """Logits of every row of every chunk, prompt rows and the prompt's open end included, not
    only the sampled ones: the legal sets, canonical rule and provisional entry at each row are
    those the model's forward has at that position."""
    prompt = compressed(100, 60)
    sequence = prompt + generated_alone(model, prompt, 10)
    core = SlotCodebooks.from_model(model, 2)
    core.add(1, sequence, prompt_length=len(prompt))
    request, logits, start = Request(sequence, 0), [], 0
    for n in (5, 17, 1, 30, 7, 100):
        ids = sequence[start : start + n]
        out = feed(core, [1] * len(ids) + [-1], ids + [3])
        request.embeds += list(out.inputs_embeds[: len(ids)])
        request.positions += out.positions[: len(ids)].tolist()
        hidden = hidden_states(model.get_decoder(), request)[start:]
        rows = torch.arange(len(ids))
        logits.append(core.logits(hidden, out, rows=rows))
        # Over only the entries installed (what a caller on a CPU asks for): the same logits (up to
        # rounding: a narrower product sums in another order), the same ids -inf.
        narrow = core.logits(hidden, out, rows=rows, entries=core.installed_bound(out, rows))
        assert_same_logits(narrow, logits[-1])
        start += len(ids)
        if start == len(sequence):
            break
    with torch.no_grad():
        out = model(input_ids=torch.tensor([sequence]), open_phrase_at=len(prompt) - 1, use_cache=False)
    assert_same_logits(torch.cat(logits), out.logits[0])


def test_a_step_and_its_logits_never_wait_for_the_host(model):
    """Counted at the dispatcher: neither a step (a prompt chunk and decoding rows, padding) nor
    the logits make a host sync: no `.item()`, `.tolist()` or tensor made from Python data."""
    core = SlotCodebooks.from_model(model, 3)
    core.add(0, compressed(110, 40))
    core.add(2, [], prompt_length=0)
    prompt = compressed(111, 30)
    slots, ids = torch.tensor([2] * 6 + [0, -1]), torch.tensor(prompt[:6] + [7, 0])
    hidden = torch.randn(2, model.config.get_text_config().hidden_size)
    rows = torch.tensor([5, 6])
    for max_rows in (None, 6):
        with count_ops() as counts:
            out = core.step(slots, ids, max_rows_per_slot=max_rows)
            core.logits(hidden, out, rows=rows)
        assert counts.host_syncs == 0, counts.syncs_by_op
        ids = torch.tensor(prompt[6:12] + [9, 0])


def test_problems_are_named(model):
    core = SlotCodebooks.from_model(model, 2)
    prompt = compressed(120, 30)
    with pytest.raises(ValueError, match="is not installed"):
        core.add(0, [5, V + 3])
    with pytest.raises(ValueError, match=r"slot must be an int in \[0, 2\)"):
        core.add(2, prompt)
    with pytest.raises(ValueError, match="num_computed must be an int in"):
        core.add(0, prompt, num_computed=len(prompt) + 1)
    core.add(0, prompt)
    with pytest.raises(ValueError, match="slot 0 holds a request"):
        core.add(0, prompt)
    feed(core, [0] * len(prompt), prompt)
    installed = int(core.codebooks.num_installed[0])
    feed(core, [0], [V + installed + 5])  # neither installed nor the provisional id
    with pytest.raises(ValueError, match=rf"slot 0, position {len(prompt)}: hyper id {V + installed + 5} is not"):
        core.raise_if_illegal()
    core.remove(0)
    core.raise_if_illegal()  # a removed slot's record goes with it
    feed(core, [1, -1], [5, 5])
    with pytest.raises(ValueError, match="row 0 of a step names slot 1, which holds no request"):
        core.raise_if_illegal()
    core.raise_if_illegal()  # raised once
    core.add(1, [5, 6, 7])
    feed(core, [1, 1, 1], [5, 6, 7], max_rows_per_slot=2)
    with pytest.raises(ValueError, match="slot 1: a step gave it more rows than max_rows_per_slot=2"):
        core.raise_if_illegal()
    with pytest.raises(ValueError, match="slots .* and ids .* must have one entry per row"):
        feed(core, [1, 1], [5])


def test_a_step_and_its_logits_trace_to_one_graph_each(model):
    """Under ``torch.compile(fullgraph=True)`` a step and the logits trace whole (any host sync or
    data-dependent branch would break the graph), and a second step of the same shapes reuses it."""
    torch._dynamo.reset()
    core = SlotCodebooks.from_model(model, 3)
    core.add(0, compressed(130, 40))
    core.add(2, [], prompt_length=0)
    prompt = compressed(131, 30)
    step = torch.compile(core.step, fullgraph=True, backend="eager")
    logits = torch.compile(core.logits, fullgraph=True, backend="eager")
    hidden = torch.randn(2, model.config.get_text_config().hidden_size)
    for t in range(2):
        with torch.compiler.set_stance("fail_on_recompile" if t else "default"):
            out = step(torch.tensor([2] * 6 + [0, -1]), torch.tensor(prompt[6 * t : 6 * t + 6] + [7, 0]), 6)
            logits(hidden, out, rows=torch.tensor([5, 6]))
    torch._dynamo.reset()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_a_step_never_syncs_and_matches_the_cpu(model):
    """On a GPU, CUDA's own sync detector sees no sync in a step or the logits, whose results are
    the CPU's."""
    import copy

    on_cuda = copy.deepcopy(model).cuda()
    cores = [SlotCodebooks.from_model(m, 4) for m in (model, on_cuda)]
    prompts, width = [compressed(140, 50), compressed(141, 36)], model.config.get_text_config().hidden_size
    rows = [[0] * 5 + [3] * 5 + [-1] * 2, [0, 3, -1, 0, 3, -1, 0, 3, -1, 3, 0, -1]]
    results = []
    for core in cores:
        device = core.live.device
        for slot, prompt in zip((0, 3), prompts):
            core.add(slot, prompt, num_computed=10)
        got, taken = [], {0: 10, 3: 10}
        for slots in rows:
            ids = []
            for slot in slots:
                ids.append(7 if slot < 0 else prompts[slot // 3][taken[slot]])
                taken[slot] = taken.get(slot, 0) + (slot >= 0)
            slots, ids = torch.tensor(slots, device=device), torch.tensor(ids, device=device)
            hidden = torch.randn(len(ids), width, generator=torch.Generator().manual_seed(0)).to(device)
            torch.cuda.set_sync_debug_mode("error")
            try:
                out = core.step(slots, ids, max_rows_per_slot=5)
                logits = core.logits(hidden, out)
            finally:
                torch.cuda.set_sync_debug_mode("default")
            got.append((out.inputs_embeds.cpu(), out.positions.cpu(), logits.cpu()))
        results.append(got)
    for (embeds, positions, logits), (cuda_embeds, cuda_positions, cuda_logits) in zip(*results):
        torch.testing.assert_close(cuda_embeds, embeds, atol=1e-4, rtol=1e-4)
        assert torch.equal(cuda_positions, positions)
        assert_same_logits(cuda_logits[:10], logits[:10])
