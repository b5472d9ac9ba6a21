"""The GPU fast path, checked on any machine: a static cache and a compiled decoding step write
exactly what the eager dynamic path writes, and a decoding step is one graph of fixed shapes."""

import copy

import pytest
import torch
from transformers import CompileConfig

from utils import (
    PAD,
    V,
    assert_same_logits,
    compressed,
    generate_ids,
    left_pad,
    padded_batch,
    step_by_step_logits,
    tiny_base,
    wrap,
)
from zip2zip_hf import Zip2ZipStaticCache


def caches_seen(model) -> tuple[list, torch.utils.hooks.RemovableHandle]:
    seen = []

    def record(_module, _args, kwargs):
        seen.append(kwargs.get("cache", kwargs.get("past_key_values")))

    return seen, model.register_forward_pre_hook(record, with_kwargs=True)


@pytest.mark.parametrize("on_device", [True, False])
@pytest.mark.parametrize(
    "mode",
    [{}, {"num_beams": 3, "num_return_sequences": 2}, {"do_sample": True, "top_k": 20}],
    ids=["greedy", "beams", "sampling"],
)
def test_static_cache_generates_what_the_dynamic_cache_does(model, mode, on_device, monkeypatch):
    monkeypatch.setattr(model, "codebooks_on_device", on_device)
    ids, mask = padded_batch()
    torch.manual_seed(0)
    dynamic = generate_ids(model, ids, mask, **mode)
    seen, handle = caches_seen(model)
    try:
        torch.manual_seed(0)
        static = generate_ids(model, ids, mask, cache_implementation="static", **mode)
    finally:
        handle.remove()
    assert torch.equal(static, dynamic)
    assert (static[:, ids.shape[1] :] >= V).any(), "the rows must write hypertokens"
    assert all(isinstance(cache, Zip2ZipStaticCache) for cache in seen) and len(seen) == 12


def test_static_cache_from_the_generation_config_is_used_too(model):
    ids, mask = padded_batch()
    config = model.generation_config
    try:
        model.generation_config = copy.deepcopy(config)
        model.generation_config.cache_implementation = "static"
        seen, handle = caches_seen(model)
        static = generate_ids(model, ids, mask)
        handle.remove()
    finally:
        model.generation_config = config
    assert torch.equal(static, generate_ids(model, ids, mask))
    assert isinstance(seen[0], Zip2ZipStaticCache)


def test_a_cache_and_cache_implementation_together_are_refused(model):
    ids, mask = padded_batch()
    cache = Zip2ZipStaticCache(config=model.config.get_text_config(), max_cache_len=128)
    with pytest.raises(ValueError, match="either a cache or cache_implementation"):
        generate_ids(model, ids, mask, cache_implementation="static", past_key_values=cache)


@pytest.mark.parametrize("on_device", [True, False])
def test_static_cache_steps_equal_teacher_forcing(model, on_device, monkeypatch):
    monkeypatch.setattr(model, "codebooks_on_device", on_device)
    ids, mask = left_pad([compressed(1, 40), compressed(2, 30)])
    with torch.no_grad():
        teacher_forced = model(input_ids=ids, attention_mask=mask).logits
        cache = Zip2ZipStaticCache(config=model.config.get_text_config(), max_cache_len=ids.shape[1])
        first = 10
        prefill = model(input_ids=ids[:, :first], attention_mask=mask[:, :first], past_key_values=cache)
        steps = [prefill.logits]
        for t in range(first, ids.shape[1]):
            out = model(input_ids=ids[:, t : t + 1], attention_mask=mask[:, : t + 1], past_key_values=cache)
            assert out.past_key_values is cache
            steps.append(out.logits)
    assert_same_logits(teacher_forced, torch.cat(steps, dim=1), mask)


def test_a_plain_static_cache_is_refused_by_name(model):
    from transformers import StaticCache

    cache = StaticCache(config=model.config.get_text_config(), max_cache_len=32)
    with pytest.raises(NotImplementedError, match="Zip2ZipStaticCache"):
        model(input_ids=torch.tensor([compressed(1, 20)]), past_key_values=cache, use_cache=True)


# ---------------------------------------------------------------------- torch.compile


@pytest.mark.slow
@pytest.mark.parametrize("static", [True, False], ids=["static", "dynamic"])
def test_a_compiled_decoding_step_is_one_graph_and_never_recompiles(model, static, monkeypatch):
    """With the codebooks on the device, each decoding step's tensor work (`_run_block`) compiles
    to one graph (fullgraph=True fails on any break). With a static cache its shapes are the same
    at every step: it compiles once. A dynamic cache grows, which costs one more compile (the
    growing length is then marked dynamic), and none after."""
    torch._dynamo.reset()
    ids, mask = left_pad([compressed(1, 60), compressed(2, 30)])
    eager = step_by_step_logits(model, ids, mask, first=10)
    cache = Zip2ZipStaticCache(config=model.config.get_text_config(), max_cache_len=ids.shape[1]) if static else None
    with torch.no_grad():  # the prompt: read by Python streams, not compiled
        out = model(input_ids=ids[:, :10], attention_mask=mask[:, :10], past_key_values=cache, use_cache=True)
    monkeypatch.setattr(model, "_run_block", torch.compile(model._run_block, fullgraph=True, backend="eager"))
    logits, cache = [out.logits], out.past_key_values
    compiling_steps = 1 if static else 2
    for t in range(10, ids.shape[1]):
        stance = "fail_on_recompile" if t >= 10 + compiling_steps else "default"
        with torch.compiler.set_stance(stance), torch.no_grad():
            out = model(input_ids=ids[:, t : t + 1], attention_mask=mask[:, : t + 1], past_key_values=cache)
        logits.append(out.logits)
    assert_same_logits(eager, torch.cat(logits, dim=1), mask)


def test_a_static_cache_too_small_for_the_call_is_an_error_naming_it(model):
    cache = Zip2ZipStaticCache(config=model.config.get_text_config(), max_cache_len=8)
    with pytest.raises(ValueError, match="static cache holds 8 positions but this call needs 12"):
        model(input_ids=torch.tensor([compressed(1, 20)[:12]]), past_key_values=cache, use_cache=True)


@pytest.mark.parametrize("static", [False, True])
def test_a_cache_already_holding_the_prompt_is_an_error_naming_it(model, static):
    """A cache handed to generate continues a prefix of the prompt; one a finished call filled
    holds the whole prompt and more, which is said as such (not as an empty input)."""
    from zip2zip_hf import Zip2ZipCache
    from zip2zip_hf._compat import output_cache_field

    ids = torch.tensor([compressed(1, 20)[:12]])
    text_config = model.config.get_text_config()
    cache = Zip2ZipStaticCache(config=text_config, max_cache_len=20) if static else Zip2ZipCache(config=text_config)
    generate = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": PAD, output_cache_field(): cache}
    model.generate(input_ids=ids, **generate)
    held = int(cache.get_seq_length())
    with pytest.raises(ValueError, match=f"the cache already holds {held} positions and input_ids only 12"):
        model.generate(input_ids=ids, **generate)
    assert int(cache.get_seq_length()) == held


@pytest.mark.slow
@pytest.mark.parametrize("mode", [{}, {"num_beams": 2}], ids=["greedy", "beams"])
def test_generate_compiles_the_static_decoding_steps_and_writes_the_same_tokens(model, mode):
    """transformers compiles the decoding steps of a static-cache generate (on CUDA by default;
    here forced on a CPU, with a backend that counts graphs and runs them eagerly). Beam search's
    steps are compiled only by the releases whose beam search asks for the compiled call."""
    import inspect

    from transformers import GenerationMixin

    torch._dynamo.reset()
    ids, mask = padded_batch()
    eager = generate_ids(model, ids, mask, **mode)
    graphs = []

    def counting(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module

    compile_config = CompileConfig(backend=counting, mode=None)
    compile_config._compile_all_devices = True  # transformers' own switch for compiling off CUDA
    compiled = generate_ids(model, ids, mask, cache_implementation="static", compile_config=compile_config, **mode)
    compiles = "num_beams" not in mode or "get_compiled_call" in inspect.getsource(GenerationMixin._beam_search)
    assert bool(graphs) == compiles, f"{len(graphs)} graphs compiled"
    assert torch.equal(compiled, eager)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("batch_size", [3, 32])
@pytest.mark.parametrize("mode", [{}, {"num_beams": 2}, {"do_sample": True, "top_k": 20}])
def test_cuda_static_generate_with_cuda_graphs_writes_the_same_tokens(mode, batch_size):
    """On CUDA, ``cache_implementation="static"`` makes generate compile the decoding steps with
    ``mode="reduce-overhead"`` (CUDA graphs, replayed on the state's fixed addresses): the same
    tokens as eager, for left-padded rows at batch 3 and 32."""
    torch._dynamo.reset()
    model = wrap(tiny_base("llama")).cuda()
    model.codebooks_on_device = None  # the default: on the device, as on any accelerator
    ids, mask = left_pad([compressed(24 + row, 30 + (7 * row) % 41) for row in range(batch_size)])
    ids, mask = ids.cuda(), mask.cuda()
    torch.manual_seed(0)
    eager = generate_ids(model, ids, mask, **mode)
    torch.manual_seed(0)
    compiled = generate_ids(model, ids, mask, cache_implementation="static", **mode)
    assert torch.equal(compiled, eager)
