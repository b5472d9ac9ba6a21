"""Zip2ZipConfig and what loading a checkpoint asks of it: a named base model, and every weight used."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from utils import V, tiny_base, wrap
from zip2zip_hf import Zip2ZipConfig, Zip2ZipForCausalLM


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("zip2zip")
    wrap(tiny_base("llama")).save_pretrained(folder)
    return folder


def edited_copy(saved, tmp_path, edit_config=None, edit_weights=None):
    config = json.loads((saved / "config.json").read_text())
    weights = load_file(saved / "model.safetensors")
    if edit_config is not None:
        edit_config(config)
    if edit_weights is not None:
        edit_weights(weights)
    (tmp_path / "config.json").write_text(json.dumps(config))
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    return tmp_path


@pytest.mark.parametrize(
    "text_config, message",
    [
        (None, "a zip2zip config needs text_config, the config of the base model it wraps"),
        ({"hidden_size": 32}, "text_config.model_type is None, which transformers .* does not know"),
        ({"model_type": "nonexistent"}, "text_config.model_type is 'nonexistent', which transformers"),
        ("llama", "text_config must be a config or a dict, got str"),
    ],
)
def test_a_config_must_name_a_known_base_model(text_config, message):
    with pytest.raises(ValueError, match=message):
        Zip2ZipConfig(text_config=text_config, initial_vocab_size=V)


@pytest.mark.parametrize("edit", ["drop", "unknown"])
def test_a_checkpoint_without_a_known_base_config_fails_before_loading(saved, tmp_path, edit):
    def edit_config(config):
        if edit == "drop":
            del config["text_config"]
        else:
            config["text_config"]["model_type"] = "nonexistent"

    folder = edited_copy(saved, tmp_path, edit_config)
    with pytest.raises(ValueError, match="text_config"):
        AutoModelForCausalLM.from_pretrained(folder)


def test_a_config_round_trips_through_its_dict():
    config = wrap(tiny_base("gpt2")).config
    again = Zip2ZipConfig.from_dict(config.to_dict())
    assert again.to_dict() == config.to_dict()
    assert type(again.text_config) is type(config.text_config)


def test_fewer_base_layers_in_the_config_than_in_the_weights_is_an_error(saved, tmp_path):
    folder = edited_copy(saved, tmp_path, lambda config: config["text_config"].update(num_hidden_layers=1))
    with pytest.raises(ValueError, match=r"unexpected: language_model\.model\.layers\.1\."):
        Zip2ZipForCausalLM.from_pretrained(folder)


def test_a_weight_the_model_has_no_place_for_is_an_error(saved, tmp_path):
    folder = edited_copy(saved, tmp_path, edit_weights=lambda weights: weights.update(stray=torch.zeros(2)))
    with pytest.raises(ValueError, match="unexpected: stray"):
        Zip2ZipForCausalLM.from_pretrained(folder)
    assert Zip2ZipForCausalLM.from_pretrained(saved) is not None  # the untouched checkpoint loads
