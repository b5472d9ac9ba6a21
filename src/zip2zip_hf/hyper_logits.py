"""The head's side of a zip2zip model: logits ``V + K`` wide, and the loss over them.

Hyper logit k at a position is ``h . f_out(entry k)``, where ``h`` is the head's input there; the
provisional slot (the entry the next id would install) is scored with its own contents. Whatever the
base causal LM does to its head's output (scales, soft-capping) is done to hyper logits alike, and
every id not legal at a position is ``-inf`` there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from .codebook_blocks import ConsumedBlock


__all__ = [
    "check_head_reproduces_base",
    "decoder_of",
    "hyper_loss",
    "postprocess_logits",
    "select_kept",
    "widen_logits",
]


def widen_logits(
    base_logits: torch.Tensor,
    hidden: torch.Tensor,
    consumed: ConsumedBlock,
    output_table: torch.Tensor | None,
    provisional_vectors: torch.Tensor,
    initial_vocab_size: int,
    max_codebook_size: int,
    text_config: PretrainedConfig,
    score_provisional: bool = True,
) -> torch.Tensor:
    """``[base logits for ids < V | hyper logits | -inf]``, ``V + K`` wide, illegal ids at -inf (and
    the provisional entry too, unless ``score_provisional``).

    ``base_logits`` are the head's raw output (model rows past V, if any, are dropped).
    Fixed work per position, no host sync: hyper logits are computed for every slot the table holds
    plus one (the provisional slot may sit just past the installed entries), then masked.
    """
    V, K = initial_vocab_size, max_codebook_size
    if output_table is None:
        output_table = hidden.new_zeros(hidden.shape[0], 0, hidden.shape[-1])
    width = min(K, output_table.shape[1] + 1)
    columns = output_table[:, :width]
    if columns.shape[1] < width:  # the provisional slot just past the installed entries
        columns = F.pad(columns, (0, 0, 0, width - columns.shape[1]))
    hyper = torch.einsum("btd,bkd->btk", hidden, columns.to(hidden.dtype))
    slot = torch.arange(width, device=hidden.device)
    provisional_scores = (hidden * provisional_vectors.to(hidden.dtype)).sum(-1)
    is_provisional = (slot == consumed.legal[..., None] - 1) & (consumed.provisional_lengths > 0)[..., None]
    hyper = torch.where(is_provisional, provisional_scores[..., None].to(hyper.dtype), hyper)
    # Masked after the post-processing, which would turn -inf into a finite -cap under soft-capping.
    unscored = slot >= consumed.legal[..., None]
    if not score_provisional:
        unscored = unscored | is_provisional
    hyper = postprocess_logits(hyper, text_config).masked_fill(unscored, float("-inf"))
    tail = base_logits.new_full((*base_logits.shape[:2], K - width), float("-inf"))
    base = postprocess_logits(base_logits[..., :V], text_config)
    return torch.cat([base, hyper.to(base_logits.dtype), tail], dim=-1)


def postprocess_logits(logits: torch.Tensor, text_config: PretrainedConfig) -> torch.Tensor:
    """What the base causal LM does to its head's output: a scale (Cohere's ``logit_scale``,
    Granite's ``logits_scaling``) and soft-capping (Gemma 2/3's ``final_logit_softcapping``).
    `Zip2ZipForCausalLM.from_base` checks that nothing else is done."""
    scale = getattr(text_config, "logit_scale", None)
    divisor = getattr(text_config, "logits_scaling", None)
    cap = getattr(text_config, "final_logit_softcapping", None)
    if scale is not None:
        logits = logits * scale
    if divisor is not None:
        logits = logits / divisor
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    return logits


def hyper_loss(
    logits: torch.Tensor,
    labels: torch.LongTensor,
    consumed: ConsumedBlock,
    initial_vocab_size: int,
    num_items_in_batch: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Next-token cross-entropy over ``V + K`` classes; a target illegal at its position raises."""
    V = initial_vocab_size
    targets = labels[:, 1:].to(logits.device)
    legal = consumed.legal[:, :-1].to(logits.device)
    counted = targets != -100
    illegal = counted & ((targets < 0) | ((targets >= V) & (targets - V >= legal)))
    if illegal.any():
        b, t = (int(i) for i in torch.nonzero(illegal)[0])
        raise ValueError(
            f"labels[{b}, {t + 1}] = {int(targets[b, t])} is not a legal target there "
            f"(legal hyper ids: {V}..{V + int(legal[b, t]) - 1})"
        )
    loss = F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="sum"
    )
    denominator = num_items_in_batch if num_items_in_batch is not None else counted.sum().clamp(min=1)
    if isinstance(denominator, torch.Tensor):
        denominator = denominator.to(loss.device)
    return loss / denominator


def decoder_of(causal_lm: PreTrainedModel) -> nn.Module:
    """A causal LM's decoder: the module its head reads the last hidden state of."""
    decoder = causal_lm.base_model
    if decoder is causal_lm and hasattr(causal_lm, "get_decoder"):
        decoder = causal_lm.get_decoder()  # e.g. Gemma 3 in 4.57, whose prefix names no attribute
    if decoder is causal_lm or decoder is None:
        raise NotImplementedError(
            f"{type(causal_lm).__name__} has no separate decoder (base_model / get_decoder()): a zip2zip "
            "model runs the decoder and the head apart, to score hypertokens with the head's input"
        )
    return decoder


@torch.no_grad()
def check_head_reproduces_base(causal_lm: PreTrainedModel) -> None:
    """Refuse a causal LM that does to its logits what `postprocess_logits` does not know: the hyper
    logits would miss it. Checked on two ids, the model's own forward against decoder + head."""
    was_training = causal_lm.training
    causal_lm.eval()  # no dropout: both runs must see the same activations
    try:
        ids = torch.tensor([[0, 1]], device=causal_lm.device)
        expected = causal_lm(input_ids=ids, use_cache=False).logits
        hidden = decoder_of(causal_lm)(input_ids=ids, use_cache=False).last_hidden_state
        ours = postprocess_logits(causal_lm.get_output_embeddings()(hidden), causal_lm.config.get_text_config())
    finally:
        causal_lm.train(was_training)
    if not torch.allclose(ours.float(), expected.float(), rtol=1e-3, atol=1e-3):
        raise NotImplementedError(
            f"{type(causal_lm).__name__} changes its head's logits in a way zip2zip cannot apply to "
            "hypertoken logits (known: logit_scale, logits_scaling, final_logit_softcapping)"
        )


def select_kept(tensor: torch.Tensor, keep: list[int], length: int) -> torch.Tensor:
    """Rows of ``tensor`` (``(B, T or kept, ...)``) at the kept positions."""
    if tensor.shape[1] == len(keep):
        return tensor
    return tensor[:, keep] if len(keep) < length else tensor
