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
    "not_canonical",
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
    canonical_ids_only: bool = True,
    open_kept: torch.BoolTensor | None = None,
) -> torch.Tensor:
    """``[base logits for ids < V | hyper logits | -inf]``, ``V + K`` wide, illegal ids at -inf (and
    the provisional entry too, unless ``score_provisional``; and, with ``canonical_ids_only``, every
    id that is not canonical there, but at the kept positions ``open_kept`` marks: see `not_canonical`).

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
    base = postprocess_logits(base_logits[..., :V], text_config)
    if canonical_ids_only:
        base_extends, hyper_extends = not_canonical(consumed, V, width)
        if open_kept is not None:  # a prompt's end: its last phrase may go on
            base_extends = base_extends & ~open_kept[..., None]
            hyper_extends = hyper_extends & ~open_kept[..., None]
        base = base.masked_fill(base_extends, float("-inf"))
        unscored = unscored | (hyper_extends & ~is_provisional)
    hyper = postprocess_logits(hyper, text_config).masked_fill(unscored, float("-inf"))
    tail = base_logits.new_full((*base_logits.shape[:2], K - width), float("-inf"))
    return torch.cat([base, hyper.to(base_logits.dtype), tail], dim=-1)


def not_canonical(consumed: ConsumedBlock, initial_vocab_size: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, kept, V)`` and ``(B, kept, width)``: the base and hyper ids that are not canonical after
    each kept position, those whose first base id would extend the phrase of the id there.

    Greedy LZW writes a phrase only when the next base id does not extend it to an entry, so after
    the phrase ``w`` its next id never starts with such an id. Every text then has exactly one id
    sequence these logits allow, the canonical one: its probability is the text's, and `generate`
    writes what training reads. Tensor work of fixed shape, no host sync.

    The provisional id's slot is left to its own rule by the caller: after a canonical prefix it is
    ``w + w[0]`` and legal only where it extends nothing, and its slot holds another entry later in
    the sequence (whose first id is what ``entry_first_ids`` gives).
    """
    V, extending = initial_vocab_size, consumed.extending
    batch_size, kept = extending.shape[:2]
    # Column V takes the padding (-1) and is dropped: every write is True, so duplicates are harmless.
    hit = torch.zeros(batch_size, kept, V + 1, dtype=torch.bool, device=extending.device)
    hit.scatter_(-1, torch.where(extending >= 0, extending, V), True)
    first_ids = consumed.entry_first_ids[:, :width]
    first_ids = F.pad(first_ids, (0, width - first_ids.shape[1]), value=V)  # slots past the entries: unscored anyway
    hyper = hit.gather(-1, first_ids[:, None, :].expand(batch_size, kept, width))
    return hit[..., :V], hyper


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
    """Next-token cross-entropy over ``V + K`` classes; a target illegal at its position, or one its
    logits rule out (not canonical there), raises."""
    V = initial_vocab_size
    targets = labels[:, 1:].to(logits.device)
    legal = consumed.legal[:, :-1].to(logits.device)
    counted = targets != -100
    illegal = counted & ((targets < 0) | ((targets >= V) & (targets - V >= legal)))
    ruled_out = (
        counted & logits[:, :-1].gather(-1, targets.clamp(0, logits.shape[-1] - 1)[..., None])[..., 0].isneginf()
    )
    if (illegal | ruled_out).any():
        b, t = (int(i) for i in torch.nonzero(illegal | ruled_out)[0])
        if illegal[b, t]:
            raise ValueError(
                f"labels[{b}, {t + 1}] = {int(targets[b, t])} is not a legal target there "
                f"(legal hyper ids: {V}..{V + int(legal[b, t]) - 1})"
            )
        raise ValueError(
            f"labels[{b}, {t + 1}] = {int(targets[b, t])} is not canonical there: its first base id extends the "
            "phrase before it, so greedy LZW never writes it and the logits rule it out (train on the ids the "
            "tokenizer writes, or set config.canonical_ids_only=False)"
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
