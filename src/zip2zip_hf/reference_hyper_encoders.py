"""The hyper-encoders of the reference zip2zip package, computed exactly as it computes them, so that
a checkpoint it trained (converted by `zip2zip_hf.interop`) gives the same logits here.

Part of a checkpoint's remote-code closure: imports only torch and sibling modules.

The reference encodes each entry as a row of M base ids padded with the pad id, and reads the pad
embedding in the padded slots. Its three encoder types, with their parameter names (a converted
checkpoint loads their weights as they are):

* ``transformer``: post-LN layers over the M slots (pairwise padding mask), then the mean over all
  M slots, padded ones included;
* ``attention``: one attention layer over the M slots plus learned positions, then that same mean;
* ``res_latent_attn``: pre-LN layers in a latent width (key padding mask, optionally causal), a
  final norm, the masked mean (or the last valid slot when causal), and optionally the first
  constituent's embedding added back (``residual``).

The unmasked mean depends on the pad embedding and on M; that is what those checkpoints learned, so
it is kept (only behind these types: zip2zip's own encoders never read padding).
"""

from __future__ import annotations

import torch
import torch.nn.attention
import torch.nn.functional as F
from torch import nn


__all__ = ["REFERENCE_ENCODER_TYPES", "build_reference_encoder"]

REFERENCE_ENCODER_TYPES = ("transformer", "attention", "res_latent_attn")


def _reference_rows(subtokens: torch.Tensor, lengths: torch.Tensor, pad_token_id: int, width: int) -> torch.Tensor:
    """Entries as the reference holds them: ``(N, M)`` base ids, the pad id past each length."""
    device = subtokens.device
    if subtokens.shape[1] < width:
        subtokens = F.pad(subtokens, (0, width - subtokens.shape[1]))
    valid = torch.arange(width, device=device) < lengths.to(device)[:, None]
    return subtokens[:, :width].masked_fill(~valid, pad_token_id)


class _SelfAttention(nn.Module):
    """Multi-head attention without biases under a ``(N, S, S)`` boolean mask."""

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.k_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.v_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.o_proj = nn.Linear(hidden_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        N, S, _ = x.shape

        def heads(projection: nn.Linear) -> torch.Tensor:
            return projection(x).view(N, S, self.num_heads, -1).transpose(1, 2).contiguous()

        out = F.scaled_dot_product_attention(heads(self.q_proj), heads(self.k_proj), heads(self.v_proj), mask[:, None])
        return self.o_proj(out.transpose(1, 2).contiguous().view(N, S, -1))


class _MLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.fc2 = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class _PostNormLayer(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, num_heads: int):
        super().__init__()
        self.mlp = _MLP(hidden_size, intermediate_size)
        self.attention = _SelfAttention(hidden_size, num_heads)
        self.post_attention_layernorm = nn.LayerNorm(hidden_size)
        self.post_mlp_layernorm = nn.LayerNorm(hidden_size)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.post_attention_layernorm(x + self.attention(x, mask)).to(x.dtype)
        return self.post_mlp_layernorm(x + self.mlp(x)).to(x.dtype)


def _reference_sdpa_backends():
    backends = torch.nn.attention.SDPBackend
    return torch.nn.attention.sdpa_kernel([backends.MATH, backends.EFFICIENT_ATTENTION, backends.FLASH_ATTENTION])


def _pairwise(valid: torch.Tensor) -> torch.Tensor:
    return valid[:, :, None] & valid[:, None, :]


class ReferenceTransformerEncoder(nn.Module):
    """The reference's ``transformer`` encoder (its v0.1 models)."""

    def __init__(self, settings: dict, max_subtokens: int):
        super().__init__()
        hidden, heads = settings["hidden_size"], settings["num_heads"]
        intermediate = settings.get("intermediate_size") or 4 * hidden
        self.pad_token_id, self.max_subtokens = settings["pad_token_id"], max_subtokens
        position_encoding = settings.get("position_encoding")
        if position_encoding not in ("learnable", None):
            raise ValueError(f"position_encoding must be 'learnable' or null, got {position_encoding!r}")
        self.pos_embed = nn.Embedding(max_subtokens, hidden) if position_encoding == "learnable" else None
        self.layers = nn.ModuleList(
            _PostNormLayer(hidden, intermediate, heads) for _ in range(settings["num_hidden_layers"])
        )

    def forward(self, subtokens: torch.Tensor, lengths: torch.Tensor, embedding_weight: torch.Tensor):
        rows = _reference_rows(subtokens.to(embedding_weight.device), lengths, self.pad_token_id, self.max_subtokens)
        x = embedding_weight[rows]
        if self.pos_embed is not None:
            x = x + self.pos_embed(torch.arange(rows.shape[1], device=x.device))
        mask = _pairwise(rows != self.pad_token_id)
        for layer in self.layers:
            x = layer(x, mask)
        return x.mean(dim=1)


class ReferenceAttentionEncoder(nn.Module):
    """The reference's ``attention`` encoder."""

    def __init__(self, settings: dict, max_subtokens: int):
        super().__init__()
        self.pad_token_id, self.max_subtokens = settings["pad_token_id"], max_subtokens
        self.pos_embed = nn.Embedding(max_subtokens, settings["hidden_size"])
        self.attention = _SelfAttention(settings["hidden_size"], settings["num_heads"])

    def forward(self, subtokens: torch.Tensor, lengths: torch.Tensor, embedding_weight: torch.Tensor):
        rows = _reference_rows(subtokens.to(embedding_weight.device), lengths, self.pad_token_id, self.max_subtokens)
        x = F.embedding(rows, embedding_weight) + self.pos_embed(torch.arange(rows.shape[1], device=rows.device))
        return self.attention(x, _pairwise(rows != self.pad_token_id)).mean(dim=1)


class _PreNormLayer(nn.Module):
    def __init__(self, dim: int, intermediate_size: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.wq = nn.Linear(dim, dim, bias=False)
        self.wk = nn.Linear(dim, dim, bias=False)
        self.wv = nn.Linear(dim, dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)
        self.w1 = nn.Linear(dim, intermediate_size, bias=False)
        self.w2 = nn.Linear(intermediate_size, dim, bias=False)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, causal: bool) -> torch.Tensor:
        N, S, D = x.shape
        normed = self.norm1(x)

        def heads(projection: nn.Linear) -> torch.Tensor:
            return projection(normed).view(N, S, self.num_heads, D // self.num_heads).transpose(1, 2)

        attn_mask = mask[:, None, None, :]
        if causal:
            attn_mask = attn_mask & torch.tril(torch.ones(S, S, device=x.device, dtype=torch.bool))
        with _reference_sdpa_backends():  # the backends the reference allows here
            out = F.scaled_dot_product_attention(heads(self.wq), heads(self.wk), heads(self.wv), attn_mask=attn_mask)
        x = x + self.wo(out.transpose(1, 2).contiguous().view(N, S, D))
        return x + self.w2(F.gelu(self.w1(self.norm2(x))))


class ReferenceResLatentAttnEncoder(nn.Module):
    """The reference's ``res_latent_attn`` encoder (zip2zip++ exports)."""

    def __init__(self, settings: dict, max_subtokens: int):
        super().__init__()
        hidden = settings["hidden_size"]
        model_hidden = settings.get("model_hidden_size") or hidden
        intermediate = settings.get("intermediate_size") or 4 * hidden
        self.pad_token_id, self.max_subtokens = settings["pad_token_id"], max_subtokens
        self.causal, self.residual = bool(settings.get("causal", False)), bool(settings.get("residual", True))
        latent = model_hidden != hidden
        self.proj_in = nn.Linear(model_hidden, hidden, bias=False) if latent else None
        self.proj_out = nn.Linear(hidden, model_hidden, bias=False) if latent else None
        self.pos_embed = nn.Embedding(max_subtokens, hidden)
        self.layers = nn.ModuleList(
            _PreNormLayer(hidden, intermediate, settings["num_heads"]) for _ in range(settings["num_hidden_layers"])
        )
        self.norm = nn.LayerNorm(hidden)

    def forward(self, subtokens: torch.Tensor, lengths: torch.Tensor, embedding_weight: torch.Tensor):
        rows = _reference_rows(subtokens.to(embedding_weight.device), lengths, self.pad_token_id, self.max_subtokens)
        x = F.embedding(rows, embedding_weight)
        first = x[:, 0, :]
        if self.proj_in is not None:
            x = self.proj_in(x)
        x = x + self.pos_embed(torch.arange(rows.shape[1], device=x.device))
        valid = rows != self.pad_token_id
        for layer in self.layers:
            x = layer(x, valid, self.causal)
        x = self.norm(x)
        if self.causal:
            last = valid.sum(-1).clamp(min=1) - 1
            result = x[torch.arange(x.shape[0], device=x.device), last]
        else:
            result = (x * valid[..., None]).sum(1) / valid.sum(-1, keepdim=True).clamp(min=1)
        if self.proj_out is not None:
            result = self.proj_out(result)
        return first + result if self.residual else result


_ENCODERS = {
    "transformer": ReferenceTransformerEncoder,
    "attention": ReferenceAttentionEncoder,
    "res_latent_attn": ReferenceResLatentAttnEncoder,
}


def build_reference_encoder(settings: dict, max_subtokens: int) -> nn.Module:
    """The reference encoder ``settings["encoder_type"]`` describes (its ``encoder`` config, plus
    ``encoder_type`` and the ``pad_token_id`` its rows are padded with)."""
    kind = settings.get("encoder_type")
    if kind not in _ENCODERS:
        raise ValueError(f"unknown reference encoder type {kind!r}: expected one of {REFERENCE_ENCODER_TYPES}")
    return _ENCODERS[kind](settings, max_subtokens)
