"""``python -m zip2zip_hf convert`` on odd input: a failed run leaves nothing behind (the checkpoint
is written beside OUT_DIR and renamed at the end), an output that is a file or a broken link, a
read-only disk, damaged or mistyped checkpoint files, non-finite weights and a missing base folder
are each one ``error:`` line and exit status 2, never a traceback."""

from __future__ import annotations

import errno
import os
import shutil
import signal

import pytest
import torch
from safetensors.torch import load_file, save_file

import zip2zip_hf.interop
from utils import edit_reference_config, reference_checkpoint, save_tiny_base_model
from zip2zip_hf import Zip2ZipForCausalLM, Zip2ZipTokenizer
from zip2zip_hf.interop import from_reference
from zip2zip_hf.tools.cli import main


pytest.importorskip("zip2zip", reason="the reference zip2zip package (make setup installs it)")
pytest.importorskip("peft")


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return save_tiny_base_model(tmp_path_factory.mktemp("base"))


@pytest.fixture(scope="module")
def saved_references(tmp_path_factory, base_dir):
    """Reference checkpoints in two layouts: the whole decoder beside the encoders, and a LoRA adapter."""
    folders = {}
    for layout in ("full", "adapter"):
        folders[layout] = tmp_path_factory.mktemp(layout)
        reference_checkpoint(folders[layout], base_dir, "llama", "transformer", layout=layout)
    return folders


@pytest.fixture
def ref(saved_references, tmp_path):
    """A fresh copy of the full-layout checkpoint, to break."""
    return shutil.copytree(saved_references["full"], tmp_path / "ref")


def convert(capsys, *argv) -> tuple[int, list[str]]:
    """Run ``convert``; return its status and the error lines it printed (progress bars aside)."""
    status = main(["convert", *map(str, argv)])
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    return status, errors


def assert_refused(capsys, message: str, *argv) -> str:
    status, errors = convert(capsys, *argv)
    assert status == 2 and len(errors) == 1, errors
    assert errors[0].startswith("zip2zip_hf convert: error: ") and message in errors[0], errors[0]
    return errors[0]


def leftovers(folder) -> list[str]:
    return sorted(name for name in os.listdir(folder) if ".converting-" in name)


# ---------------------------------------------------------------------- the output folder


def test_a_failure_mid_write_leaves_nothing_and_the_next_run_succeeds(ref, tmp_path, capsys, monkeypatch):
    """A full disk after the weights are written: no half-written OUT_DIR for the next run to refuse."""
    out = tmp_path / "out"

    def full_disk(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with monkeypatch.context() as patch:
        patch.setattr(Zip2ZipTokenizer, "save_pretrained", full_disk)
        assert_refused(capsys, "No space left on device", ref, out)
    assert not out.exists() and leftovers(tmp_path) == []
    status, errors = convert(capsys, ref, out)
    assert status == 0 and errors == []
    assert (out / "model.safetensors").is_file() and (out / "tokenizer_config.json").is_file()
    assert type(Zip2ZipForCausalLM.from_pretrained(out)) is Zip2ZipForCausalLM
    assert leftovers(tmp_path) == []


def test_a_safetensors_write_error_mid_save_leaves_the_empty_folder_empty(ref, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    real_save = Zip2ZipForCausalLM.save_pretrained

    def half_written(self, folder, *args, **kwargs):
        real_save(self, folder, *args, **kwargs)
        raise RuntimeError("Error while serializing: IoError(No space left on device (os error 28))")

    monkeypatch.setattr(Zip2ZipForCausalLM, "save_pretrained", half_written)
    assert_refused(capsys, "No space left on device", ref, out)
    assert out.is_dir() and os.listdir(out) == [] and leftovers(tmp_path) == []


def test_sigterm_mid_write_takes_back_what_it_wrote_without_a_traceback(ref, tmp_path, capsys, monkeypatch):
    """SIGTERM (kill, timeout, docker stop) cleans up as Ctrl-C does: no staging folder, no parents made."""
    out = tmp_path / "made" / "for" / "out"
    real_save = Zip2ZipTokenizer.save_pretrained
    handler_before = signal.getsignal(signal.SIGTERM)

    def terminated_mid_save(self, *args, **kwargs):
        real_save(self, *args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(Zip2ZipTokenizer, "save_pretrained", terminated_mid_save)
    status = main(["convert", str(ref), str(out)])
    err = capsys.readouterr().err
    assert status == 128 + signal.SIGTERM and "zip2zip_hf convert: stopped by SIGTERM" in err
    assert "Traceback" not in err
    assert os.listdir(tmp_path) == ["ref"]  # neither the staging folder nor the parents it made
    assert signal.getsignal(signal.SIGTERM) == handler_before


def test_a_staging_folder_of_a_killed_run_is_removed_and_named(ref, tmp_path, capsys):
    """SIGKILL leaves the staging folder: the next run removes it (its process is gone) and says so;
    the staging folder of a run still going is left alone."""
    out = tmp_path / "out"
    dead = tmp_path / ".out.converting-999999999-0123abcd"  # beyond any pid Linux gives (4194304 at most)
    alive = tmp_path / f".out.converting-{os.getpid()}-0123abcd"
    for staging in (dead, alive):
        staging.mkdir()
        (staging / "model.safetensors").write_bytes(b"half")
    assert main(["convert", str(ref), str(out)]) == 0
    assert f"removed {dead}" in capsys.readouterr().err
    assert not dead.exists() and alive.is_dir()
    status, errors = convert(capsys, ref, tmp_path / "other")
    assert alive.is_dir()  # another OUT_DIR's staging folders are not looked at


def test_a_long_out_dir_name_fits_its_staging_folder(ref, tmp_path, capsys):
    out = tmp_path / ("x" * 250)
    status, errors = convert(capsys, ref, out)
    assert status == 0 and errors == [] and (out / "config.json").is_file()
    assert leftovers(tmp_path) == []


def test_an_empty_folder_and_missing_parents_are_fine(ref, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert convert(capsys, ref, empty) == (0, [])
    assert (empty / "config.json").is_file()
    nested = tmp_path / "a" / "b" / "out"
    assert convert(capsys, ref, nested) == (0, [])
    assert (nested / "config.json").is_file()


def test_a_link_to_an_empty_folder_is_written_through(ref, tmp_path, capsys):
    target = tmp_path / "target"
    target.mkdir()
    (tmp_path / "link").symlink_to(target)
    assert convert(capsys, ref, tmp_path / "link") == (0, [])
    assert (tmp_path / "link").is_symlink() and (target / "config.json").is_file()


def test_an_existing_file_is_refused_and_kept(ref, tmp_path, capsys):
    out = tmp_path / "out"
    out.write_text("mine")
    assert_refused(capsys, "an existing file, not a folder", ref, out)
    assert out.read_text() == "mine"


def test_a_dangling_symlink_is_refused_and_kept(ref, tmp_path, capsys):
    out = tmp_path / "out"
    out.symlink_to(tmp_path / "nowhere")
    assert_refused(capsys, "a symbolic link to", ref, out)
    assert out.is_symlink() and not (tmp_path / "nowhere").exists()


def test_a_folder_that_is_not_empty_is_refused_before_any_work(ref, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("mine")
    monkeypatch.setattr(zip2zip_hf.interop, "from_reference", lambda *a, **k: pytest.fail("converted anyway"))
    assert_refused(capsys, "not empty", ref, out)
    assert os.listdir(out) == ["mine.txt"]


def test_a_read_only_disk_is_found_before_any_work(ref, tmp_path, capsys, monkeypatch):
    """As root, permissions do not stop a write, so the read-only file system is simulated where the
    command makes its first folder there."""
    disk = tmp_path / "disk"
    disk.mkdir()
    real_mkdir = os.mkdir

    def read_only(path, *args, **kwargs):
        if os.path.dirname(os.path.abspath(path)).startswith(str(disk)):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", read_only)
    monkeypatch.setattr(zip2zip_hf.interop, "from_reference", lambda *a, **k: pytest.fail("converted anyway"))
    assert_refused(capsys, "Read-only file system", ref, disk / "out")
    assert_refused(capsys, "Read-only file system", ref, disk / "deeper" / "out")
    assert os.listdir(disk) == []


# ---------------------------------------------------------------------- the base model


def test_a_missing_local_base_folder_is_said_so(ref, tmp_path, capsys):
    message = assert_refused(
        capsys, f"--base {tmp_path / 'gone'}: no such folder", ref, tmp_path / "out", "--base", tmp_path / "gone"
    )
    assert "repo" not in message.lower()
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []
    with pytest.raises(ValueError, match="no such folder"):
        from_reference(ref, base_model=tmp_path / "gone")


def test_a_base_named_by_the_config_that_is_not_here_is_said_so(ref, tmp_path, capsys):
    edit_reference_config(ref, base_model_name_or_path=str(tmp_path / "trained-on-another-machine"))
    message = assert_refused(capsys, "which is not here: pass base_model= (--base)", ref, tmp_path / "out")
    assert "repo" not in message.lower()


def test_nan_in_the_base_models_own_weights_is_said_so(saved_references, base_dir, tmp_path, capsys):
    """An adapter is merged into the base model's weights (a whole decoder would replace them)."""
    ref = shutil.copytree(saved_references["adapter"], tmp_path / "ref")
    base = shutil.copytree(base_dir, tmp_path / "base")
    _poison(base / "model.safetensors", "model.layers.0.self_attn.k_proj.weight", float("nan"))
    message = assert_refused(
        capsys, "model.layers.0.self_attn.k_proj.weight has non-finite values", ref, tmp_path / "out", "--base", base
    )
    assert f"the base model {base}" in message


# ---------------------------------------------------------------------- the checkpoint's files


def _poison(file, key, value):
    state = load_file(file)
    state[key] = state[key].clone()
    if isinstance(value, torch.dtype):
        state[key] = state[key].to(value)
    else:
        state[key].view(-1)[0] = value
    save_file(state, file, metadata={"format": "pt"})


def _cut(file, keep):
    data = file.read_bytes()
    file.write_bytes(data[: keep(len(data))])


CONFIG_BREAKAGES = [
    (dict(compression=5), "compression must be an object of settings, not 5"),
    (dict(encoder="x"), "encoder must be an object of settings, not 'x'"),
    ({"compression.disabled_ids": 3}, "compression.disabled_ids must be a list of ids, not 3"),
    ({"compression.disabled_ids": ["0"]}, "compression.disabled_ids must be a list of ids"),
    ({"compression.max_subtokens": "3"}, "compression.max_subtokens must be an integer of at least 1, not '3'"),
    ({"compression.max_codebook_size": True}, "compression.max_codebook_size must be an integer"),
    ({"encoder.num_heads": "4"}, "encoder.num_heads must be a positive integer, not '4'"),
    ({"encoder.num_hidden_layers": 2.0}, "encoder.num_hidden_layers must be a positive integer"),
    ({"encoder.tie_encoders": "no"}, "encoder.tie_encoders must be true or false"),
    (dict(position_mode=["compressed"]), "position_mode ['compressed'] is not one of"),
    (dict(base_model_name_or_path=7), "base_model_name_or_path must be a string"),
]


@pytest.mark.parametrize("changes, message", CONFIG_BREAKAGES)
def test_a_config_section_of_the_wrong_type_is_named(ref, tmp_path, capsys, changes, message):
    edit_reference_config(ref, **changes)
    assert_refused(capsys, message, ref, tmp_path / "out")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize(
    "text, message",
    [("[1, 2]", "a JSON object expected, not list"), ("{compression", "not a JSON file"), ("", "not a JSON file")],
)
def test_a_config_that_is_not_a_json_object_is_named(ref, tmp_path, capsys, text, message):
    (ref / "zip2zip_config.json").write_text(text)
    assert_refused(capsys, message, ref, tmp_path / "out")


@pytest.mark.parametrize("file", ["zip2zip_encoders.safetensors", "model.safetensors"])
@pytest.mark.parametrize("keep", [lambda n: 0, lambda n: 5, lambda n: n // 2], ids=["empty", "5-bytes", "half"])
def test_a_truncated_safetensors_file_is_named(ref, tmp_path, capsys, file, keep):
    _cut(ref / file, keep)
    assert_refused(capsys, f"{file} is not a complete safetensors file", ref, tmp_path / "out")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_a_truncated_adapter_is_named(saved_references, tmp_path, capsys):
    ref = shutil.copytree(saved_references["adapter"], tmp_path / "ref")
    _cut(ref / "adapter_model.safetensors", lambda n: n // 2)
    assert_refused(capsys, "adapter_model.safetensors is not a complete safetensors file", ref, tmp_path / "out")


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_decoder_weights_are_named_not_blamed_on_the_head(ref, tmp_path, capsys, value):
    _poison(ref / "model.safetensors", "model.layers.1.mlp.up_proj.weight", value)
    message = assert_refused(capsys, "model.layers.1.mlp.up_proj.weight has non-finite values", ref, tmp_path / "out")
    assert "head" not in message


def test_a_non_finite_adapter_is_named_and_the_base_given_is_left_as_it_was(saved_references, base_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    ref = shutil.copytree(saved_references["adapter"], tmp_path / "ref")
    key = next(k for k in load_file(ref / "adapter_model.safetensors") if "lora_B" in k)
    _poison(ref / "adapter_model.safetensors", key, float("nan"))
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(ValueError, match=rf"adapter_model.safetensors: {key} has non-finite values"):
        from_reference(ref, base_model=base)
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())


@pytest.mark.parametrize(
    "value, message",
    [
        (float("nan"), "has non-finite values"),
        (float("-inf"), "has non-finite values"),
        (torch.int64, "holds torch.int64 values, not floating-point weights"),
    ],
)
def test_bad_encoder_weights_are_named(ref, tmp_path, capsys, value, message):
    key = "input_encoder.layers.0.mlp.fc1.weight"
    _poison(ref / "zip2zip_encoders.safetensors", key, value)
    assert_refused(capsys, f"zip2zip_encoders.safetensors: {key} {message}", ref, tmp_path / "out")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []
