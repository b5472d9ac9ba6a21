"""What a decoding step must be for CUDA graphs (``torch.compile(mode="reduce-overhead")``, what
`generate` uses with a static cache), checked on a CPU:

(a) no graph reads a tensor that an earlier step's graph returned (CUDA graphs reuse that memory);
(b) a static decoding loop compiles to one graph and never recompiles after warm-up;
(c) every tensor of the codebook state keeps its address from step to step;
(d) a decoding step waits for the host not once (generate reads the legality at its end);
(e) the compiled step (inductor) computes the logits eager computes.
"""

from __future__ import annotations

import pytest
import torch
from transformers import CompileConfig, LogitsProcessor

from utils import V, assert_same_logits, compressed, generate_ids, left_pad, padded_batch
from zip2zip_hf import Zip2ZipStaticCache
from zip2zip_hf.evaluation.op_counts import count_ops
from zip2zip_hf.hyper_state import DeferredLegalityChecks


MODES = [{}, {"num_beams": 3, "num_return_sequences": 2}, {"do_sample": True, "top_k": 20}]


@pytest.fixture(autouse=True)
def on_device(model, monkeypatch):
    """The codebooks on the device, as on any accelerator."""
    monkeypatch.setattr(model, "codebooks_on_device", True)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class CudaGraphEmulation:
    """A ``torch.compile`` backend that holds graph outputs to CUDA graphs' rule: an output belongs
    to the decoding step that made it. Every output (that is not one of the graph's own inputs, i.e.
    state written in place) is tagged with its step and kept alive, so its address is never reused;
    a graph that takes a tagged tensor (or a view of one) from an earlier step fails."""

    def __init__(self):
        self.step = 0
        self.graphs = 0
        self.made_at: dict[int, int] = {}  # storage address -> step
        self.kept: list[torch.Tensor] = []
        # A plain function: transformers deep-copies its compile config, which would copy a bound method's object.
        self.backend = lambda graph_module, example_inputs: self._compile(graph_module)

    def _compile(self, graph_module):
        self.graphs += 1

        def run(*args):
            tensors = [arg for arg in args if isinstance(arg, torch.Tensor)]
            for tensor in tensors:
                made = self.made_at.get(tensor.untyped_storage().data_ptr())
                assert made is None or made == self.step, (
                    f"step {self.step} reads a tensor that the graph of step {made} returned"
                )
            outputs = graph_module(*args)
            inputs = {tensor.untyped_storage().data_ptr() for tensor in tensors}
            for output in outputs if isinstance(outputs, (tuple, list)) else [outputs]:
                if isinstance(output, torch.Tensor) and output.untyped_storage().data_ptr() not in inputs:
                    self.made_at[output.untyped_storage().data_ptr()] = self.step
                    self.kept.append(output)
            return outputs

        return run

    def count_steps(self, model):
        def next_step(*_):
            self.step += 1

        return model.register_forward_pre_hook(next_step)


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES, ids=["greedy", "beams", "sampling"])
def test_no_step_reads_what_an_earlier_step_returned(model, mode):
    """(a) With a static cache, generate compiles the decoding steps; under CUDA graphs a tensor a
    step's graph returned is overwritten by the next replay. 40 steps: every buffer that grows has
    grown (the record of fed ids, the tables), and the rows write hypertokens."""
    emulation = CudaGraphEmulation()
    config = CompileConfig(backend=emulation.backend, mode=None)
    config._compile_all_devices = True  # transformers' own switch for compiling off CUDA
    ids, mask = padded_batch()
    torch.manual_seed(0)
    eager = generate_ids(model, ids, mask, 40, **mode)
    handle = emulation.count_steps(model)
    try:
        torch.manual_seed(0)
        compiled = generate_ids(model, ids, mask, 40, cache_implementation="static", compile_config=config, **mode)
    finally:
        handle.remove()
    # Beam search's steps are compiled by some transformers releases only (not 5.24).
    assert emulation.graphs >= 1 or "num_beams" in mode, "generate should have compiled the decoding steps"
    assert torch.equal(compiled, eager)
    assert (compiled[:, ids.shape[1] :] >= V).any(), "the rows must write hypertokens"


def static_decoding(model, ids, mask, first: int, step_model=None, **forward):
    """Prefill ``first`` ids into a static cache, then feed the rest one id per call (through
    ``step_model``, default the model). Returns the logits of every position and the cache."""
    cache = Zip2ZipStaticCache(config=model.config.get_text_config(), max_cache_len=ids.shape[1])
    step_model = model if step_model is None else step_model
    with torch.no_grad():
        out = model(input_ids=ids[:, :first], attention_mask=mask[:, :first], past_key_values=cache)
        logits = [out.logits]
        for t in range(first, ids.shape[1]):
            out = step_model(
                input_ids=ids[:, t : t + 1], attention_mask=mask[:, : t + 1], past_key_values=cache, **forward
            )
            logits.append(out.logits)
    return torch.cat(logits, dim=1), cache


@pytest.mark.slow
def test_a_static_decoding_loop_is_one_graph_that_never_recompiles(model):
    """(b) 50 decoding steps of the whole model compiled: the step's state update, encoders, hyper
    logits and masks are one graph; what stays eager (checks, snapshot, record) is disabled, so it
    makes no graph of its own; and after the first step nothing recompiles (a recompiled graph
    would reach the backend again)."""
    emulation = CudaGraphEmulation()
    compiled = torch.compile(model, backend=emulation.backend)
    ids, mask = left_pad([compressed(1, 62), compressed(2, 40)])
    expected, _ = static_decoding(model, ids, mask, first=12)
    checks = DeferredLegalityChecks()
    cache = Zip2ZipStaticCache(config=model.config.get_text_config(), max_cache_len=ids.shape[1])
    with torch.no_grad():
        logits = [model(input_ids=ids[:, :12], attention_mask=mask[:, :12], past_key_values=cache).logits]
        for t in range(12, ids.shape[1]):
            step = dict(input_ids=ids[:, t : t + 1], attention_mask=mask[:, : t + 1], past_key_values=cache)
            logits.append(compiled(**step, deferred_checks=checks).logits)
    checks.raise_if_illegal()
    assert emulation.graphs == 1, f"{emulation.graphs} graphs for one decoding step"
    assert_same_logits(expected, torch.cat(logits, dim=1), mask)


def state_tensors(state) -> dict[str, torch.Tensor]:
    """Every tensor the codebook state keeps between steps, by name."""
    rows = state.store
    found = {
        "table": rows.codebooks.table,
        "state": rows.codebooks.state,
        "first_illegal": rows.first_illegal,
        "input_table": state.input_table,
        "output_table": state.output_table,
        "fed": state._fed,
    }
    found.update({f"saved {i}": saved for i, saved in enumerate(rows._saved)})
    return found


@pytest.mark.parametrize("beams", [False, True])
def test_every_state_tensor_keeps_its_address(model, beams):
    """(c) A captured graph holds addresses: after the first decoding step (which moves the
    codebooks to the device) the state never allocates again, beam reordering included."""
    ids, mask = padded_batch()
    addresses = []

    def record(_module, _args, kwargs, _output):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        state = getattr(cache, "hyper_state", None)
        if state is not None and state.num_positions > ids.shape[1]:
            addresses.append({name: tensor.data_ptr() for name, tensor in state_tensors(state).items()})

    handle = model.register_forward_hook(record, with_kwargs=True)
    try:
        out = generate_ids(model, ids, mask, 30, cache_implementation="static", **({"num_beams": 2} if beams else {}))
    finally:
        handle.remove()
    assert (out[:, ids.shape[1] :] >= V).any(), "the rows must write hypertokens"
    assert len(addresses) >= 28 and all(seen == addresses[0] for seen in addresses)


@pytest.mark.parametrize("batch_size", [1, 3])
def test_a_static_decoding_step_never_waits_for_the_host(model, batch_size):
    """(d) Counted at the dispatcher: a decoding step with a static cache under generate's deferred
    legality check makes no host sync at all; a user's own forward reads the legality once."""
    ids, mask = left_pad([compressed(seed, 30 + 7 * seed) for seed in range(batch_size)])
    checks = DeferredLegalityChecks()
    cache = Zip2ZipStaticCache(config=model.config.get_text_config(), max_cache_len=ids.shape[1] + 2)
    step = torch.tensor([[5]] * batch_size)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, past_key_values=cache)
        for t in range(2):  # the first step moves the codebooks to the device
            step_mask = torch.cat([mask, torch.ones(batch_size, t + 1, dtype=mask.dtype)], dim=1)
            forward = dict(input_ids=step, attention_mask=step_mask, past_key_values=cache)
            with count_ops() as counts:
                model(**forward, deferred_checks=checks) if t else model(**forward)
    assert counts.host_syncs == 0, counts.syncs_by_op
    checks.raise_if_illegal()  # nothing illegal was fed
    cache.crop(-1)
    with torch.no_grad(), count_ops() as counts:
        model(**forward)
    assert counts.syncs_by_op == {"Tensor.tolist": 1}


class WritesAnIllegalId(LogitsProcessor):
    """Unmasks a hyper id that is never installed and makes it the pick at one step."""

    def __init__(self, at_length: int, code: int):
        self.at_length, self.code = at_length, code

    def __call__(self, input_ids, scores):
        if input_ids.shape[1] == self.at_length:
            scores[:, self.code] = 1e9
        return scores


def test_generate_still_names_an_illegal_id_a_processor_forced(model):
    """The deferred check is still a check: an id that was not legal, written because a logits
    processor unmasked it, is named when generate returns."""
    from transformers import LogitsProcessorList

    ids, mask = padded_batch()
    code = V + model.codec.max_codebook_size - 1
    processor = LogitsProcessorList([WritesAnIllegalId(ids.shape[1] + 3, code)])
    with pytest.raises(ValueError, match=rf"row 0, position {ids.shape[1] + 3}: hyper id {code} is not installed"):
        generate_ids(model, ids, mask, 8, logits_processor=processor, cache_implementation="static")


@pytest.mark.slow
def test_inductor_compiled_steps_compute_the_eager_logits(model):
    """(e) The decoding step compiled by inductor (C++ on a CPU) gives the eager logits."""
    ids, mask = left_pad([compressed(3, 40), compressed(4, 28)])
    expected, _ = static_decoding(model, ids, mask, first=16)
    compiled = torch.compile(model)
    logits, _ = static_decoding(
        model, ids, mask, first=16, step_model=compiled, deferred_checks=DeferredLegalityChecks()
    )
    assert_same_logits(expected, logits, mask)
