"""Hyper-encoders: map the constituent base-token embeddings of each hypertoken to one vector.

Part of a checkpoint's remote-code closure: imports only torch, transformers and sibling modules.

Every encoder takes ``(subtokens, lengths, embedding_weight)`` and gathers the constituent rows from
``embedding_weight`` itself, so the same class serves the input side (input-embedding rows) and the
output side (lm_head rows).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

from .configuration_zip2zip import HYPER_ENCODER_KINDS, HYPER_ENCODER_RESIDUALS
from .reference_hyper_encoders import build_reference_encoder


__all__ = [
    "AttentionHyperEncoder",
    "MeanHyperEncoder",
    "build_hyper_encoder",
    "encode_entries",
    "hyper_encoder_of",
]


def _check_inputs(subtokens: torch.Tensor, lengths: torch.Tensor, embedding_weight: torch.Tensor) -> None:
    if subtokens.dim() != 2 or lengths.dim() != 1 or subtokens.shape[0] != lengths.shape[0]:
        raise ValueError(
            f"Expected subtokens (N, M_pad) and lengths (N,), got {tuple(subtokens.shape)} and {tuple(lengths.shape)}"
        )
    if embedding_weight.dim() != 2:
        raise ValueError(f"Expected embedding_weight (rows, D), got {tuple(embedding_weight.shape)}")


def _slots(lengths: torch.Tensor, width: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """``(slots, valid, count)`` of ``width`` slots per row: the slot indices ``(M,)``, the validity mask
    ``(N, M)`` and the number of valid slots ``(N, 1)``, at least 1 (what a mean divides by).

    Three ops: an encoder call is paid per op on a GPU (a decoding step makes two), so these few
    tensors are computed once and every mask, weight and index below is one op away from them.
    """
    lengths = lengths.to(device)[:, None]
    slots = torch.arange(width, device=device)
    return slots, slots < lengths, lengths.clamp(1, width)


def _gather(subtokens: torch.Tensor, valid: torch.Tensor, embedding_weight: torch.Tensor) -> torch.Tensor:
    """Constituent embeddings ``(N, M_pad, D)``.

    Padding slots are read as row 0, so their ids may be anything (even out of range) and can
    never change a result: everything downstream gives them weight 0 or masks them out.
    """
    return embedding_weight[subtokens.to(embedding_weight.device).where(valid, 0)]


def _accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """``torch.promote_types(dtype, torch.float32)`` for a floating dtype, decided without dispatching."""
    return dtype if dtype.itemsize >= 4 else torch.float32


def _mean_weights(valid: torch.Tensor, count: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``(N, M)`` weights of the masked mean in ``dtype``: ``1 / count`` on valid slots, 0 on padding
    (all 0 for a row with no valid slot, whose mean is then zeros rather than NaN)."""
    if dtype == torch.get_default_dtype():  # what a bool / integer division gives: one op
        return valid / count
    return valid.to(dtype) / count


def _weighted_mean(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``sum_m weights[n, m] * values[n, m]`` of ``values (N, M, D)`` as one batched matmul, in
    ``weights.dtype`` (at least float32, so a bf16 model's average is not rounded at every addition),
    returned in ``values.dtype``. Padding slots hold finite values of weight 0, so they add exactly 0."""
    mean = torch.bmm(weights[:, None, :], values.to(weights.dtype))[:, 0]
    return mean.to(values.dtype)


def _masked_mean(values: torch.Tensor, valid: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """Mean of ``values (N, M, D)`` over the valid slots of each row, in ``values.dtype``."""
    return _weighted_mean(values, _mean_weights(valid, count, _accumulate_dtype(values.dtype)))


def _residual(
    embeddings: torch.Tensor, valid: torch.Tensor, count: torch.Tensor, kind: str, weights: torch.Tensor
) -> torch.Tensor:
    """The masked mean, or the first or last valid constituent, of ``embeddings (N, M, D)``; the mean
    reuses ``weights`` (`_mean_weights`) where their dtype and device are the ones it needs."""
    if kind == "mean":
        accumulate = _accumulate_dtype(embeddings.dtype)
        if (weights.dtype, weights.device) != (accumulate, embeddings.device):
            weights = _mean_weights(valid, count, accumulate)
        return _weighted_mean(embeddings, weights)
    if kind == "first":
        return embeddings[:, 0]
    index = (count - 1)[:, :, None].expand(-1, 1, embeddings.shape[-1])
    return embeddings.gather(1, index)[:, 0]


class MeanHyperEncoder(nn.Module):
    """Parameter-free hyper-encoder: the masked mean of the constituent embeddings."""

    def forward(
        self, subtokens: torch.LongTensor, lengths: torch.LongTensor, embedding_weight: torch.Tensor
    ) -> torch.Tensor:
        """Encode ``N`` hypertokens.

        Args:
            subtokens: ``(N, M_pad)`` base ids; slots at or beyond a row's length are padding (any value).
            lengths: ``(N,)`` number of constituents per row (``>= 1``).
            embedding_weight: ``(rows, D)`` the table the constituents are read from.

        Returns:
            ``(N, D)`` in the dtype and on the device of ``embedding_weight``.
        """
        _check_inputs(subtokens, lengths, embedding_weight)
        _, valid, count = _slots(lengths, subtokens.shape[1], embedding_weight.device)
        return _masked_mean(_gather(subtokens, valid, embedding_weight), valid, count)


class AttentionHyperEncoderBlock(GradientCheckpointingLayer):
    """Pre-LN transformer block over the constituents of each hypertoken (no causal mask).

    A `GradientCheckpointingLayer`, so ``model.gradient_checkpointing_enable()`` covers it too.
    """

    def __init__(self, size: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.attention_norm = nn.LayerNorm(size)
        self.qkv_proj = nn.Linear(size, 3 * size)
        self.o_proj = nn.Linear(size, size)
        self.mlp_norm = nn.LayerNorm(size)
        self.up_proj = nn.Linear(size, 4 * size)
        self.down_proj = nn.Linear(4 * size, size)

    def forward(self, hidden_states: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        """``hidden_states (N, M, h)``; ``key_mask (N, 1, 1, M)`` bool, True where a key may be attended."""
        n, m, size = hidden_states.shape
        qkv = self.qkv_proj(self.attention_norm(hidden_states))
        query, key, value = qkv.view(n, m, 3, self.num_heads, size // self.num_heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(query, key, value, attn_mask=key_mask)
        hidden_states = hidden_states + self.o_proj(attended.transpose(1, 2).reshape(n, m, size))
        return hidden_states + self.down_proj(F.gelu(self.up_proj(self.mlp_norm(hidden_states))))


class AttentionHyperEncoder(nn.Module):
    """Small transformer hyper-encoder with a residual.

    ``output = residual(constituents) + proj_out(masked_mean(transformer(proj_in(constituents) + pos)))``.
    ``proj_out`` starts at zero, so a fresh encoder outputs exactly its residual (a vector the base
    model already understands) and training learns a correction on top. The residual is the masked
    mean of the constituents, or the first or last of them (``residual``): on the input side, the
    last constituent starts a model much closer to its base (see the README's quality results).

    Args:
        hidden_size: D, the width of the embedding rows read and of the output.
        latent_size: h, the width inside the encoder (default ``hidden_size``).
        num_layers: number of pre-LN blocks.
        num_heads: attention heads; must divide ``latent_size``.
        max_subtokens: M, the most constituents per hypertoken (learned positions for M slots).
        residual: ``"mean"``, ``"first"`` or ``"last"`` (`HYPER_ENCODER_RESIDUALS`).
    """

    def __init__(
        self,
        hidden_size: int,
        latent_size: int | None = None,
        num_layers: int = 1,
        num_heads: int = 4,
        max_subtokens: int = 4,
        residual: str = "mean",
    ):
        super().__init__()
        if residual not in HYPER_ENCODER_RESIDUALS:
            raise ValueError(f"residual must be one of {HYPER_ENCODER_RESIDUALS}, got {residual!r}")
        self.residual = residual
        latent_size = latent_size or hidden_size
        if latent_size % num_heads:
            raise ValueError(f"latent_size {latent_size} is not divisible by num_heads {num_heads}")
        if max_subtokens < 1 or num_layers < 0:
            raise ValueError(f"Need max_subtokens >= 1 and num_layers >= 0, got {max_subtokens} and {num_layers}")
        self.hidden_size = hidden_size
        self.latent_size = latent_size
        self.max_subtokens = max_subtokens
        # Always a Linear (even when h == D) so the weight names do not depend on the sizes.
        self.proj_in = nn.Linear(hidden_size, latent_size)
        self.position_embedding = nn.Parameter(torch.empty(max_subtokens, latent_size))
        self.layers = nn.ModuleList(AttentionHyperEncoderBlock(latent_size, num_heads) for _ in range(num_layers))
        self.norm = nn.LayerNorm(latent_size)
        self.proj_out = nn.Linear(latent_size, hidden_size)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """(Re-)initialise every parameter, ``proj_out`` to zero so the encoder starts as the masked mean.

        The owning model calls this from its ``_init_weights``: transformers' default init would
        otherwise give ``proj_out`` random weights. Uses only ``torch.nn.init`` (through the modules'
        own ``reset_parameters``), which transformers 5 guards so loaded weights are not overwritten.
        """
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.LayerNorm)):
                module.reset_parameters()
        nn.init.normal_(self.position_embedding, std=0.02)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(
        self, subtokens: torch.LongTensor, lengths: torch.LongTensor, embedding_weight: torch.Tensor
    ) -> torch.Tensor:
        """Encode ``N`` hypertokens.

        Args:
            subtokens: ``(N, M_pad)`` base ids with ``M_pad <= max_subtokens``; slots at or beyond a
                row's length are padding (any value) and never change that row's output.
            lengths: ``(N,)`` number of constituents per row (``1 <= length <= M_pad``).
            embedding_weight: ``(rows, D)`` the table the constituents are read from.

        Returns:
            ``(N, D)`` in the dtype and on the device of ``embedding_weight``. ``N == 0`` is fine and
            still runs every parameter (empty), so DDP sees them all used.
        """
        _check_inputs(subtokens, lengths, embedding_weight)
        if subtokens.shape[1] > self.max_subtokens:
            raise ValueError(f"subtokens has {subtokens.shape[1]} slots, more than max_subtokens={self.max_subtokens}")
        if embedding_weight.shape[1] != self.hidden_size:
            raise ValueError(f"embedding_weight has width {embedding_weight.shape[1]}, expected {self.hidden_size}")
        slots, valid, count = _slots(lengths, subtokens.shape[1], embedding_weight.device)
        embeddings = _gather(subtokens, valid, embedding_weight)

        # The transformer runs in the parameters' dtype/device: usually the model's, but an encoder
        # kept in float32 next to a bf16 base (mixed-precision training) works too.
        parameter = self.proj_in.weight
        # Padding keys are masked out; padding queries still attend to their row's valid keys and are
        # given weight 0 by the pooling below. Slot 0 always stays visible (``count >= 1``) so even a
        # (malformed) length-0 row never has an all-masked softmax, whose NaN would poison the backward
        # pass (and the pooling, where 0 * NaN is NaN).
        key_mask = (slots < count).to(parameter.device)[:, None, None, :]
        weights = _mean_weights(valid, count, _accumulate_dtype(parameter.dtype)).to(parameter.device)
        residual = _residual(embeddings, valid, count, self.residual, weights)
        hidden_states = self.proj_in(embeddings.to(device=parameter.device, dtype=parameter.dtype))
        hidden_states = hidden_states + self.position_embedding[: hidden_states.shape[1]]
        for layer in self.layers:
            hidden_states = layer(hidden_states, key_mask)
        correction = self.proj_out(_weighted_mean(self.norm(hidden_states), weights))
        return residual + correction.to(device=residual.device, dtype=residual.dtype)


def build_hyper_encoder(
    kind: str,
    hidden_size: int,
    max_subtokens: int,
    latent_size: int | None = None,
    num_layers: int = 1,
    num_heads: int = 4,
    residual: str = "mean",
    reference: dict | None = None,
) -> nn.Module:
    """Build a hyper-encoder: ``kind="mean"`` (`MeanHyperEncoder`, the other settings unused),
    ``kind="attention"`` (`AttentionHyperEncoder`) or ``kind="reference"`` (the reference package's
    encoder that ``reference`` describes, `build_reference_encoder`)."""
    if kind == "reference":
        return build_reference_encoder(reference, max_subtokens)
    if kind == "mean":
        if residual != "mean":
            raise ValueError(f"a mean hyper-encoder has no residual to choose (got {residual!r})")
        return MeanHyperEncoder()
    if kind == "attention":
        return AttentionHyperEncoder(
            hidden_size,
            latent_size=latent_size,
            num_layers=num_layers,
            num_heads=num_heads,
            max_subtokens=max_subtokens,
            residual=residual,
        )
    raise ValueError(f"Unknown hyper-encoder kind {kind!r}; expected one of {HYPER_ENCODER_KINDS}")


def encode_entries(encoder: nn.Module, subtokens: torch.LongTensor, lengths: torch.LongTensor, weight: torch.Tensor):
    """Encoder vectors of the given entries; most decoding steps have none, and skip the call."""
    if len(subtokens) == 0:
        return weight.new_zeros(0, weight.shape[-1])
    return encoder(subtokens, lengths, weight)


def hyper_encoder_of(config, residual: str = "mean") -> nn.Module:
    """The hyper-encoder a `Zip2ZipConfig` describes (the input and output encoders share its
    settings; the input one takes the config's ``input_hyper_encoder_residual``)."""
    return build_hyper_encoder(
        kind=config.hyper_encoder,
        hidden_size=config.get_text_config().hidden_size,
        max_subtokens=config.max_subtokens,
        latent_size=config.hyper_encoder_hidden_size,
        num_layers=config.hyper_encoder_num_layers,
        num_heads=config.hyper_encoder_num_heads,
        reference=config.reference_hyper_encoder,
        residual=residual,
    )
