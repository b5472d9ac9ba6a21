"""A zip2zip checkpoint as a vLLM model: vLLM's own implementation of the base architecture, with
the hyper-encoders and the per-request slots of `SlotCodebooks` around it.

vLLM builds the base model it knows (``text_config.architectures``: Llama, Qwen2, Mistral...) from
the checkpoint's nested config and loads its weights under ``language_model.``; the hyper-encoders
load from ``input_hyper_encoder.`` / ``output_hyper_encoder.``. Each step the runner's adapter
(`vllm_runner`) hands the model the step's schedule (which slot each row belongs to, which rows are
sampled); `forward` feeds the rows to their slots' codebooks and runs the base model on the
resulting embeddings and positions, and `compute_logits` widens the sampled rows' logits to V + K
with exactly the legality mask `generate` uses.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..hyper_encoder import hyper_encoder_of
from ..modeling_zip2zip import HYPER_ENCODER_NAMES
from .slots import SlotCodebooks, SlotStep


__all__ = ["Zip2ZipVllmForCausalLM", "StepSchedule"]

LANGUAGE_MODEL = "language_model."


@dataclass
class StepSchedule:
    """One engine step as the model needs it: ``row_slots`` ``(rows,)`` each input row's slot (-1:
    padding), the most rows any slot has, and the rows whose logits are sampled."""

    row_slots: torch.LongTensor
    max_rows_per_slot: int
    logits_indices: torch.LongTensor


class Zip2ZipVllmForCausalLM(nn.Module):
    """vLLM's model contract (``__init__(*, vllm_config, prefix)``, ``embed_input_ids``, ``forward``,
    ``compute_logits``, ``load_weights``) for a zip2zip checkpoint."""

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__()
        from vllm.model_executor.models.utils import init_vllm_registered_model, maybe_prefix

        config = vllm_config.model_config.hf_config
        text_config = config.get_text_config()
        check_engine_features(vllm_config)
        self.config = config
        self.language_model = init_vllm_registered_model(
            vllm_config=vllm_config,
            hf_config=text_config,
            prefix=maybe_prefix(prefix, "language_model"),
            architectures=base_architectures(text_config),
        )
        self.input_hyper_encoder = hyper_encoder_of(
            config, residual=getattr(config, "input_hyper_encoder_residual", "mean")
        )
        self.output_hyper_encoder = None if config.tie_hyper_encoders else hyper_encoder_of(config)
        self.max_num_seqs = vllm_config.scheduler_config.max_num_seqs
        self.slots: SlotCodebooks | None = None  # built once the weights are loaded
        self.schedule: StepSchedule | None = None  # the next step's, set by the runner's adapter
        self._sampled: tuple[SlotStep, torch.LongTensor] | None = None  # the last step, its sampled rows

    # ------------------------------------------------------------------ weights

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load a checkpoint that `save_pretrained` or ``export`` wrote: the base model's weights
        under ``language_model.``, the encoders' under their names. An unknown key, or an encoder
        weight missing or of another shape, is an error naming it."""
        expected = {f"{name}.{key}": p for name, m in self._encoders().items() for key, p in m.named_parameters()}
        loaded: set[str] = set()

        def base_weights():
            for name, tensor in weights:
                if name.startswith(LANGUAGE_MODEL):
                    yield name[len(LANGUAGE_MODEL) :], tensor
                elif name in expected:
                    parameter = expected[name]
                    if parameter.shape != tensor.shape:
                        raise ValueError(
                            f"checkpoint weight {name} has shape {tuple(tensor.shape)}, the model expects "
                            f"{tuple(parameter.shape)}"
                        )
                    parameter.data.copy_(tensor)
                    loaded.add(name)
                else:
                    raise ValueError(f"checkpoint weight {name} is not a weight of this zip2zip model")

        loaded |= {LANGUAGE_MODEL + name for name in self.language_model.load_weights(base_weights())}
        missing = sorted(set(expected) - loaded)
        if missing:
            raise ValueError(f"the checkpoint lacks the hyper-encoder weights {', '.join(missing)}")
        self._build_slots()
        return loaded

    def _encoders(self) -> dict[str, nn.Module]:
        modules = {name: getattr(self, name) for name in HYPER_ENCODER_NAMES}
        return {name: module for name, module in modules.items() if module is not None}

    def _build_slots(self) -> None:
        inner = self.language_model
        output = inner.lm_head if hasattr(inner, "lm_head") else inner.model.embed_tokens
        self.slots = SlotCodebooks(
            self.config,
            inner.model.embed_tokens,
            output,
            self.input_hyper_encoder,
            self.input_hyper_encoder if self.output_hyper_encoder is None else self.output_hyper_encoder,
            self.max_num_seqs,
            # On a CPU a read of the device costs nothing: encode and score only what is installed.
            host_reads_free=inner.model.embed_tokens.weight.device.type == "cpu",
        )

    # ------------------------------------------------------------------ a step

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Base ids' embeddings (what vLLM asks of a model outside a step; hyper ids need a slot)."""
        return self.language_model.embed_input_ids(input_ids.clamp(0, self.config.initial_vocab_size - 1))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, intermediate_tensors=None, inputs_embeds=None):
        """Feed the step's rows to their slots, run the base model on their embeddings. A forward
        with no schedule (vLLM's dummy runs: profiling, warm-up) is padding only."""
        schedule, self.schedule = self.schedule, None  # one forward per schedule
        rows = len(input_ids)
        if schedule is None:
            row_slots, most = torch.full((rows,), -1, dtype=torch.long, device=input_ids.device), 1
        else:
            row_slots, most = schedule.row_slots[:rows], schedule.max_rows_per_slot
        step = self.slots.step(row_slots, input_ids, max_rows_per_slot=most)
        self._sampled = (step, schedule.logits_indices) if schedule is not None else None
        # In "compressed" mode the positions are vLLM's own; in "base" mode a hypertoken sits at
        # its last base token, which only the slots know.
        positions = step.positions if self.config.position_mode == "base" else positions
        return self.language_model(None, positions, intermediate_tensors, step.inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """``(R, V + K)`` logits of the sampled rows: the base model's, widened by the slots (after a
        dummy run, the base logits with every hyper id ``-inf``)."""
        base_logits = self.language_model.compute_logits(hidden_states)
        sampled, self._sampled = self._sampled, None
        if sampled is None:
            V, K = self.config.initial_vocab_size, self.config.max_codebook_size
            wide = base_logits.new_full((len(hidden_states), V + K), float("-inf"))
            wide[:, :V] = base_logits[:, :V]
            return wide
        step, rows = sampled
        return self.slots.logits(hidden_states, step, rows=rows, base_logits=base_logits)


def base_architectures(text_config) -> list[str]:
    """The base model's architecture, as vLLM names it; an error naming it where vLLM has none."""
    from vllm import ModelRegistry

    architectures = list(text_config.architectures or [])
    if not architectures:  # a config saved without them: its model type's causal LM
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(text_config.model_type)
        architectures = [name] if name else []
    supported = set(ModelRegistry.get_supported_archs())
    if not architectures or not set(architectures) & supported:
        what = ", ".join(architectures) or f"model type {text_config.model_type!r}"
        raise ValueError(f"vLLM has no implementation of this zip2zip checkpoint's base model ({what})")
    return architectures


def check_engine_features(vllm_config) -> None:
    """Refuse, at load and by name, what an engine may be started with that zip2zip cannot serve."""
    if vllm_config.speculative_config is not None:
        raise ValueError("speculative decoding is not supported for zip2zip models on vLLM")
    if vllm_config.lora_config is not None:
        raise ValueError("LoRA adapters (--enable-lora) are not supported for zip2zip models on vLLM")
    if vllm_config.use_v2_model_runner:
        raise ValueError(
            "zip2zip models on vLLM run on Model Runner V1: unset VLLM_USE_V2_MODEL_RUNNER (or set it to 0)"
        )


def row_slots(slots_in_order: np.ndarray, num_scheduled: np.ndarray, rows: int, device) -> torch.LongTensor:
    """Each input row's slot: a request's rows are contiguous, in the batch's order; the rest -1."""
    out = np.full(rows, -1, dtype=np.int64)
    slots = np.repeat(slots_in_order, num_scheduled)
    out[: len(slots)] = slots
    return torch.from_numpy(out).to(device)
