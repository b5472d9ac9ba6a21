"""`python -m zip2zip_hf uptrain` (and `eval --window`) on bad input: a clear error (one `error:` line on
stderr, exit status 2) or the right behaviour, and nothing a user saved lost. Above all, the adapter this
package ships is never written: every test checks its files byte for byte, and a guard fails any test
whose export would land inside the package (even on code that would write there).

Tiny base models built in code and a few steps: the errors come before any training."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import pytest
from transformers import Trainer

import zip2zip_hf
import zip2zip_hf.tools.smollm2
import zip2zip_hf.tools.uptrain as uptrain
from utils import TINY_UPTRAIN_RECIPE, save_tiny_base_model, stdlib_text
from zip2zip_hf.tools.cli import main


PACKAGE = Path(zip2zip_hf.__file__).resolve().parent
SHIPPED = PACKAGE / "embedded" / "smollm2-zip2zip"
RECIPE = TINY_UPTRAIN_RECIPE
STEPS = 4  # of the run every resume test starts from (checkpoints at 2 and 4)


def tree_hashes(folder: Path) -> dict[str, str]:
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


@pytest.fixture(autouse=True)
def shipped_adapter_untouched(monkeypatch):
    """Every test: the shipped adapter is byte-identical afterwards, and no export is even attempted
    inside the package (the real export is wrapped; a test that means the shipped adapter patches
    `EMBEDDED_ZIP2ZIP` to a copy elsewhere)."""
    before = tree_hashes(SHIPPED)
    real_export = uptrain.export

    def guarded(model, folder, *args, **kwargs):
        if Path(folder).resolve().is_relative_to(PACKAGE):
            pytest.fail(f"an export into the installed package: {folder}")
        return real_export(model, folder, *args, **kwargs)

    monkeypatch.setattr(uptrain, "export", guarded)
    yield
    assert tree_hashes(SHIPPED) == before, "the shipped adapter changed"


@pytest.fixture(scope="module", autouse=True)
def short_held_out():
    """The held-out texts cut short: scoring them is most of a tiny run's time."""
    texts = {kind: [text[:1500] for text in parts[:2]] for kind, parts in uptrain.held_out_texts().items()}
    unseen = uptrain.unseen_held_out(300)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(uptrain, "held_out_texts", lambda: texts)
        patch.setattr(uptrain, "unseen_held_out", lambda: unseen)
        yield


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    return save_tiny_base_model(tmp_path_factory.mktemp("base"))  # 256 positions


def uptrain_argv(base_dir: Path, run: Path, steps: int = STEPS, recipe: dict | None = None, *more: str) -> list[str]:
    argv = ["uptrain", "--model", str(base_dir), "--recipe", json.dumps({**RECIPE, **(recipe or {})})]
    argv += ["--output-dir", str(run), "--steps", str(steps), "--save-steps", "2", "--eval-steps", "100"]
    return [*argv, "--logging-steps", "100", *more]


@pytest.fixture(scope="module")
def trained(base_dir, tmp_path_factory) -> Path:
    """A finished 4-step run, exported to ``RUN/adapter``: copy it, never change it."""
    run = tmp_path_factory.mktemp("trained") / "run"
    assert main(uptrain_argv(base_dir, run, STEPS, None, "--export", str(run / "adapter"))) == 0
    return run


@pytest.fixture
def run(trained, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    return copy


def error_line(capsys) -> str:
    """The one line a refused command printed on stderr (nothing else there)."""
    err = capsys.readouterr().err
    noise = ("Warning", "warnings.warn", "it/s]")  # warnings of other libraries, progress bars
    lines = [line for line in err.strip().splitlines() if not any(part in line for part in noise)]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("zip2zip_hf uptrain: error: ") or lines[0].startswith("zip2zip_hf eval: error: ")
    return lines[0]


def steps_of(run: Path) -> list[int]:
    return sorted(
        int(path.name[11:]) for path in run.glob("checkpoint-*") if re.fullmatch(r"checkpoint-\d+", path.name)
    )


# ---------------------------------------------------------------------- 1. the export


def test_default_export_is_a_new_folder_in_the_output_dir(base_dir, tmp_path, capsys):
    """Without --export the adapter goes to OUTPUT_DIR/adapter (said in the help and at the end), and
    the shipped adapter is left alone (the autouse fixture checks it)."""
    run = tmp_path / "run"
    assert main(uptrain_argv(base_dir, run, 1)) == 0
    export = run / "adapter"
    assert f"wrote {export}" in capsys.readouterr().out
    assert sorted(p.name for p in export.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "uptrain.json",
    ]
    assert json.loads((export / "uptrain.json").read_text())["steps"] == 1
    assert not list(run.glob(".*"))  # no staging folder left behind
    with pytest.raises(SystemExit):
        main(["uptrain", "--help"])
    assert "OUTPUT_DIR/adapter" in " ".join(capsys.readouterr().out.split())


def test_an_existing_export_is_overwritten_only_when_asked(base_dir, run, tmp_path, capsys):
    export = run / "adapter"
    saved = tree_hashes(export)
    # Asking for the step the run is at: nothing to train, so only the export is written again.
    assert main(uptrain_argv(base_dir, run)) == 2
    assert "holds an export already; pass --overwrite" in error_line(capsys)
    assert tree_hashes(export) == saved
    assert main(uptrain_argv(base_dir, run, STEPS, None, "--overwrite")) == 0
    out = capsys.readouterr().out
    assert "nothing to train, exporting it" in out and f"wrote {export}" in out
    assert steps_of(run) == [2, 4]  # no step trained
    record = json.loads((export / "uptrain.json").read_text())
    assert record["steps"] == STEPS and [entry["step"] for entry in record["curve"]] == [0, 4]

    other = tmp_path / "mine"  # a folder holding something else is never written, --overwrite or not
    other.mkdir()
    (other / "notes.txt").write_text("keep")
    assert main(uptrain_argv(base_dir, run, STEPS, None, "--export", str(other), "--overwrite")) == 2
    assert "not empty and not an uptrain export" in error_line(capsys)
    assert main(uptrain_argv(base_dir, run, STEPS, None, "--export", str(other / "notes.txt"))) == 2
    assert "exists and is not a folder" in error_line(capsys)
    assert (other / "notes.txt").read_text() == "keep"


@pytest.mark.parametrize("inside", ["embedded/smollm2-zip2zip", "embedded/another", "somewhere"])
def test_an_export_never_goes_into_the_package(base_dir, tmp_path, capsys, inside):
    run = tmp_path / "run"
    assert main(uptrain_argv(base_dir, run, 2, None, "--export", str(PACKAGE / inside))) == 2
    assert "inside the installed zip2zip_hf package" in error_line(capsys)
    assert not run.exists() and not (PACKAGE / "embedded" / "another").exists()


def test_an_exported_adapter_becomes_a_checkpoint_by_export_and_nowhere_else(trained, tmp_path, capsys):
    """eval and serve name an adapter folder as what it is; export writes it as a checkpoint over its
    base, which loads as the adapter does."""
    import torch
    from transformers import AutoTokenizer

    from zip2zip_hf import Zip2ZipForCausalLM
    from zip2zip_hf.tools.embedded import load_uptrain_export

    adapter = trained / "adapter"
    text = tmp_path / "text.py"
    text.write_text("x = 1\n" * 20)
    for argv in (["eval", str(adapter), str(text)], ["serve", str(adapter)]):
        assert main(argv) == 2
        assert f"{adapter}: an adapter written by uptrain, not a checkpoint" in capsys.readouterr().err
    out = tmp_path / "checkpoint"
    assert main(["export", str(adapter), str(out)]) == 0
    expected_model, expected_tokenizer = load_uptrain_export(adapter)
    model, tokenizer = Zip2ZipForCausalLM.from_pretrained(out).eval(), AutoTokenizer.from_pretrained(out)
    ids = tokenizer("def f(x):\n    return x\n" * 3, return_tensors="pt")["input_ids"]
    assert (
        ids.tolist() == expected_tokenizer("def f(x):\n    return x\n" * 3, return_tensors="pt")["input_ids"].tolist()
    )
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected_model(ids).logits)
    assert json.loads((out / "uptrain.json").read_text()) == json.loads((adapter / "uptrain.json").read_text())
    assert main(["eval", str(out), str(text)]) == 0


def test_a_run_never_goes_into_the_package(base_dir, tmp_path, capsys):
    run = PACKAGE / "embedded" / "a-run"
    assert main(uptrain_argv(base_dir, run, 2, None, "--export", str(tmp_path / "out"))) == 2
    line = error_line(capsys)
    assert "--output-dir" in line and "inside the installed zip2zip_hf package" in line
    assert not run.exists() and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_replace_shipped_adapter_is_the_one_way_into_it(base_dir, tmp_path, monkeypatch, capsys):
    """`make uptrain` passes --replace-shipped-adapter: it writes EMBEDDED_ZIP2ZIP (here a copy of the
    shipped adapter, and the embedded base a tiny one) and takes neither --export nor --model."""
    makefile = (Path(__file__).resolve().parents[1] / "Makefile").read_text()
    assert "-m zip2zip_hf uptrain --replace-shipped-adapter $(UPTRAIN_ARGS)" in makefile
    run = tmp_path / "run"
    for extra in (["--export", str(tmp_path / "out")], ["--model", str(base_dir)]):
        argv = ["uptrain", "--replace-shipped-adapter", "--output-dir", str(run), *extra]
        assert main(argv) == 2
        assert "--replace-shipped-adapter" in error_line(capsys)

    copy = tmp_path / "embedded" / "smollm2-zip2zip"
    shutil.copytree(SHIPPED, copy)
    monkeypatch.setattr(uptrain, "EMBEDDED_ZIP2ZIP", copy)
    monkeypatch.setattr(zip2zip_hf.tools.smollm2, "smollm2_path", lambda weights=True: base_dir)
    argv = uptrain_argv(base_dir, run, 2)
    argv.remove("--model")
    argv.remove(str(base_dir))
    assert main([*argv, "--replace-shipped-adapter"]) == 0
    assert f"wrote {copy}" in capsys.readouterr().out
    assert json.loads((copy / "uptrain.json").read_text())["steps"] == 2
    assert not (run / "adapter").exists()


# ---------------------------------------------------------------------- 5. checkpoints


def test_a_truncated_last_checkpoint_is_skipped(base_dir, run, tmp_path, capsys):
    weights = run / "checkpoint-4" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert main(uptrain_argv(base_dir, run, 4, None, "--export", str(tmp_path / "export"))) == 0
    captured = capsys.readouterr()
    assert (
        "warning: skipped" in captured.err and "checkpoint-4: adapter_model.safetensors is unreadable" in captured.err
    )
    assert f"resuming from {run / 'checkpoint-2'} (step 2)" in captured.out
    assert steps_of(run) == [2, 4] and (run / "damaged-checkpoint-4").is_dir()  # kept, out of the way
    assert (run / "checkpoint-4" / "optimizer.pt").is_file()
    record = json.loads((tmp_path / "export" / "uptrain.json").read_text())
    assert record["steps"] == 4 and [entry["step"] for entry in record["curve"]] == [0, 4]


def test_a_checkpoint_cut_off_mid_save_is_skipped(base_dir, run, tmp_path, capsys):
    """A newer checkpoint-6 holding only adapter_config.json (a kill mid-save by an older version)."""
    (run / "checkpoint-6").mkdir()
    shutil.copy(run / "checkpoint-4" / "adapter_config.json", run / "checkpoint-6")
    assert main(uptrain_argv(base_dir, run, 6, None, "--export", str(tmp_path / "export"))) == 0
    captured = capsys.readouterr()
    assert "checkpoint-6: adapter_model.safetensors is missing" in captured.err
    assert "resuming from" in captured.out and "checkpoint-4 (step 4)" in captured.out
    assert steps_of(run) == [4, 6] and (run / "damaged-checkpoint-6" / "adapter_config.json").is_file()
    assert json.loads((tmp_path / "export" / "uptrain.json").read_text())["steps"] == 6


class Killed(BaseException):
    pass


@pytest.mark.slow
def test_a_checkpoint_appears_whole_or_not_at_all(base_dir, tmp_path, monkeypatch, capsys):
    """Killed while saving step 4 (after the adapter, before the optimizer): no checkpoint-4 at all,
    and the next run resumes from checkpoint-2 without a warning."""
    run = tmp_path / "run"
    real_save = Trainer._save_optimizer_and_scheduler

    def killed_at_step_4(self, output_dir):
        if self.state.global_step == 4:
            raise Killed
        return real_save(self, output_dir)

    monkeypatch.setattr(Trainer, "_save_optimizer_and_scheduler", killed_at_step_4)
    with pytest.raises(Killed):
        main(uptrain_argv(base_dir, run, 4))
    assert steps_of(run) == [2] and not (run / "checkpoint-4").exists()
    monkeypatch.setattr(Trainer, "_save_optimizer_and_scheduler", real_save)
    capsys.readouterr()
    assert main(uptrain_argv(base_dir, run, 4)) == 0
    captured = capsys.readouterr()
    assert "warning" not in captured.err and "resuming from" in captured.out
    assert steps_of(run) == [2, 4] and not (run / ".checkpoint-staging").exists()
    saved = json.loads((run / "checkpoint-4" / "uptrain_recipe.json").read_text())
    assert saved["recipe"]["lora_r"] == RECIPE["lora_r"]


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"lora_r": 8}, "lora_r (4 in the run, 8 now)"),
        ({"max_codebook_size": 128}, "max_codebook_size (K) (64 in the run, 128 now)"),
        ({"max_subtokens": 4}, "max_subtokens (M) (3 in the run, 4 now)"),
        ({"model": {"hyper_encoder": "mean"}}, 'model.hyper_encoder ("attention" in the run, "mean" now)'),
        ({"learning_rate": 1e-3}, "learning_rate (0.0005 in the run, 0.001 now)"),
    ],
)
def test_another_recipe_is_refused_by_name(base_dir, run, tmp_path, capsys, change, named):
    saved = tree_hashes(run)
    assert main(uptrain_argv(base_dir, run, 6, change, "--export", str(tmp_path / "export"))) == 2
    line = error_line(capsys)
    assert "checkpoint-4 was trained with another recipe" in line and named in line
    assert tree_hashes(run) == saved and not (tmp_path / "export").exists()


def test_another_rank_in_a_checkpoint_without_its_recipe(base_dir, run, tmp_path, capsys):
    """Checkpoints of an older version carry no uptrain_recipe.json: the rank comes from the adapter."""
    for step in (2, 4):
        (run / f"checkpoint-{step}" / "uptrain_recipe.json").unlink(missing_ok=True)
    assert main(uptrain_argv(base_dir, run, 6, {"lora_r": 8}, "--export", str(tmp_path / "export"))) == 2
    assert "lora_r (4 in the run, 8 now)" in error_line(capsys)


def test_fewer_steps_than_the_run_has_is_nothing_to_do(base_dir, run, tmp_path, capsys):
    saved = tree_hashes(run)
    assert main(uptrain_argv(base_dir, run, 2, None, "--export", str(tmp_path / "export"))) == 2
    line = error_line(capsys)
    assert "checkpoint-4 is at step 4 already, past --steps 2: nothing to do" in line
    assert tree_hashes(run) == saved and not (tmp_path / "export").exists()


# ---------------------------------------------------------------------- 6. arguments


@pytest.mark.parametrize(
    ("recipe", "message"),
    [
        ("{lora_r: 8}", "--recipe: not valid JSON"),
        ("[1]", "--recipe: a JSON object of recipe fields"),
        ({"lr": 1}, "--recipe: unknown field 'lr'"),
        ({"window": 0}, "--recipe: window must be at least 1, got 0"),
        ({"batch_size": 0}, "--recipe: batch_size must be at least 1, got 0"),
        ({"max_codebook_size": "64"}, '--recipe: max_codebook_size must be an integer, got "64"'),
        ({"max_subtokens": 2.0}, "--recipe: max_subtokens must be an integer, got 2.0"),
        ({"lora_r": True}, "--recipe: lora_r must be an integer, got true"),
        ({"learning_rate": "5e-4"}, '--recipe: learning_rate must be a finite number, got "5e-4"'),
        ({"seed": -1}, "--recipe: seed must be from 0 to 4294967295, got -1"),
        ({"model": {"hyper_encoder": "bogus"}}, "--recipe: model: hyper_encoder must be one of 'attention', 'mean'"),
        ({"model": {"encoder": "mean"}}, "--recipe: model: unknown setting 'encoder'"),
        ({"model": {"position_mode": "x"}}, "--recipe: model: position_mode must be one of"),
        ({"distillation": {"ce": 0, "span": 0}}, "--recipe: distillation: every loss term is 0"),
        ({"distillation": {"ce": 0}}, "--recipe: distillation: every loss term is 0"),  # span stays the recipe's 0
        ({"distillation": {"kl": 1}}, "--recipe: distillation: unknown term 'kl'"),
        ({"window": 256}, "--recipe: window 256 needs 257 positions (a BOS token, then the window) but the base"),
        ({"eval_window": 1024}, "--recipe: eval_window 1024 needs 1025 positions"),
    ],
)
def test_a_bad_recipe_is_one_line(base_dir, tmp_path, capsys, recipe, message):
    run = tmp_path / "run"
    text = json.dumps({**RECIPE, **recipe}) if isinstance(recipe, dict) else recipe  # the rest fits the base
    argv = ["uptrain", "--model", str(base_dir), "--recipe", text, "--output-dir", str(run), "--steps", "1"]
    assert main([*argv, "--export", str(tmp_path / "out")]) == 2
    assert message in error_line(capsys)
    assert not run.exists() and not (tmp_path / "out").exists()


def test_loss_terms_a_recipe_leaves_out_keep_the_recipe_defaults():
    from zip2zip_hf.tools.uptrain import UptrainRecipe, parse_recipe

    recipe = parse_recipe(json.dumps({"distillation": {"span": 0.5}}))
    assert recipe.distillation == {**UptrainRecipe().distillation, "span": 0.5}


@pytest.mark.parametrize(
    "option", [["--eval-steps", "0"], ["--steps", "-3"], ["--steps", "0"], ["--save-steps", "0"], ["--threads", "0"]]
)
def test_a_count_below_one_is_a_usage_error(tmp_path, capsys, option):
    with pytest.raises(SystemExit) as exit_info:
        main(["uptrain", "--output-dir", str(tmp_path / "run"), *option])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"error: argument {option[0]}: must be at least 1, got {option[1]}" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_a_model_that_is_not_a_model_folder(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("x")
    for model, message in (
        ("missing", "no such folder"),
        ("file", "not a folder"),
        ("empty", "not a saved model folder (no config.json)"),
    ):
        argv = ["uptrain", "--model", str(tmp_path / model), "--output-dir", str(tmp_path / "run")]
        assert main([*argv, "--export", str(tmp_path / "out")]) == 2
        assert f"--model {tmp_path / model}: {message}" in error_line(capsys)


def test_a_zip2zip_checkpoint_or_an_empty_name_as_the_base_is_one_line(base_dir, tmp_path, capsys):
    """--model is a plain base model: a zip2zip checkpoint folder is refused by what it is (as the
    embedded name is), an empty one (an unset shell variable) is not the default, a config.json that
    is not a JSON object is named; all before anything loads."""
    zip2zip = tmp_path / "z2z"
    zip2zip.mkdir()
    (zip2zip / "config.json").write_text(json.dumps({"model_type": "zip2zip", "architectures": ["X"]}))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("[]")
    for model, message in (
        (str(zip2zip), f"--model {zip2zip}: a zip2zip checkpoint, and uptrain wraps a plain base model"),
        ("", "--model '': empty"),
        (str(broken), f"{broken / 'config.json'}: holds a JSON list, not an object"),
    ):
        assert main(["uptrain", "--model", model, "--output-dir", str(tmp_path / "run")]) == 2
        assert message in error_line(capsys)
    assert not (tmp_path / "run").exists()


def test_fsdp_without_a_launcher_is_one_line_before_loading(base_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert main(uptrain_argv(base_dir, tmp_path / "run", 2, None, "--fsdp")) == 2
    assert "--fsdp shards the model over processes: launch them with torchrun" in error_line(capsys)
    assert not (tmp_path / "run").exists()


@pytest.fixture
def read_only(monkeypatch, tmp_path) -> Path:
    """A folder in which nothing can be made, as on a read-only disk (chmod binds no root)."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    real_mkdir = os.mkdir

    def mkdir(path, *args, **kwargs):
        if Path(os.fsdecode(path)).resolve().is_relative_to(folder):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fsdecode(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", mkdir)
    return folder


@pytest.mark.parametrize("option", ["--export", "--output-dir"])
def test_a_read_only_folder_is_refused_before_training(base_dir, tmp_path, read_only, capsys, option):
    folders = {"--export": str(tmp_path / "out"), "--output-dir": str(tmp_path / "run"), option: str(read_only / "x")}
    argv = ["uptrain", "--model", str(base_dir), "--recipe", json.dumps(RECIPE), "--steps", "2"]
    assert main([*argv, "--export", folders["--export"], "--output-dir", folders["--output-dir"]]) == 2
    captured = capsys.readouterr()
    assert "training rows" not in captured.out  # refused before any work
    assert f"{option} {read_only / 'x'}: cannot write in {read_only} (Read-only file system)" in captured.err
    assert not (tmp_path / "run").exists()


def test_eval_window_beyond_the_model_positions(base_dir, tmp_path, capsys):
    text = tmp_path / "code.py"
    text.write_text(stdlib_text(3000), encoding="utf-8")
    assert main(["eval", str(base_dir), str(text), "--window", "256", "--device", "cpu"]) == 2
    line = error_line(capsys)
    assert "--window 256:" in line and "has 256 positions" in line and "use --window 255 or less" in line
    assert main(["eval", str(base_dir), str(text), "--window", "255", "--device", "cpu", "--json"]) == 0


# ---------------------------------------------------------------------- several processes


@pytest.mark.parametrize(
    ("world", "batch_size", "more", "message"),
    [
        (
            "2",
            3,
            [],
            "--recipe: batch_size 3 (rows per optimizer step, over all processes) is not a multiple of the 2",
        ),
        ("1", 4, ["--per-device-batch-size", "3"], "--per-device-batch-size 3 does not divide the 4 rows each"),
        ("2", 8, ["--per-device-batch-size", "3"], "use a divisor of 4"),
    ],
)
def test_a_batch_the_processes_cannot_share_is_refused(
    base_dir, tmp_path, capsys, monkeypatch, world, batch_size, more, message
):
    """The recipe's batch_size is the rows per step over all processes: it must split evenly (checked
    before any process starts working; WORLD_SIZE is what torchrun and accelerate launch set)."""
    monkeypatch.setenv("WORLD_SIZE", world)
    monkeypatch.setenv("RANK", "0")
    assert main(uptrain_argv(base_dir, tmp_path / "run", 2, {"batch_size": batch_size}, *more)) == 2
    assert message in error_line(capsys)
    assert not (tmp_path / "run").exists()


def test_a_checkpoint_resumes_only_with_the_sharding_it_was_written_with(base_dir, run, capsys, monkeypatch):
    """A DDP / one-process checkpoint is not resumed with --fsdp (nor an FSDP one without), and an
    accelerate FSDP configuration is refused in favour of --fsdp: before any training."""
    monkeypatch.setenv("LOCAL_RANK", "0")  # as torchrun sets it: --fsdp is refused without a launcher
    assert main(uptrain_argv(base_dir, run, STEPS + 2, None, "--fsdp", "--overwrite")) == 2
    line = error_line(capsys)
    assert "checkpoint-4 was written by a run without --fsdp: resume it without --fsdp" in line
    checkpoint = run / "checkpoint-4"
    (checkpoint / "pytorch_model_fsdp.bin").write_bytes((checkpoint / "optimizer.pt").read_bytes())
    (checkpoint / "optimizer.pt").rename(checkpoint / "optimizer.bin")
    assert uptrain.checkpoint_damage(checkpoint) is None  # an FSDP checkpoint's files
    assert main(uptrain_argv(base_dir, run, STEPS + 2, None, "--overwrite")) == 2
    assert "checkpoint-4 was written by a run with --fsdp: resume it with --fsdp" in error_line(capsys)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert main(uptrain_argv(base_dir, run, STEPS + 2, None, "--overwrite")) == 2
    assert "accelerate launch was configured for FSDP: pass --fsdp to uptrain" in error_line(capsys)
    assert steps_of(run) == [2, 4]
