"""Hyper-encoders: the masked mean, the attention encoder's residual start, padding invariance, dtypes."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from zip2zip_hf.hyper_encoder import AttentionHyperEncoder, MeanHyperEncoder, build_hyper_encoder


ROWS, D, M = 50, 16, 4


def random_batch(n: int, generator: torch.Generator, max_len: int = M):
    lengths = torch.randint(1, max_len + 1, (n,), generator=generator)
    subtokens = torch.randint(0, ROWS, (n, max_len), generator=generator)
    return subtokens, lengths


def fill_padding(subtokens, lengths, generator, low=0, high=ROWS):
    """The same batch with every padding slot replaced by a random id in [low, high)."""
    padding = torch.arange(subtokens.shape[1]) >= lengths[:, None]
    noise = torch.randint(low, high, subtokens.shape, generator=generator)
    return torch.where(padding, noise, subtokens)


def trained_encoder(seed: int = 0, num_layers: int = 2) -> AttentionHyperEncoder:
    """An attention encoder whose proj_out is no longer zero, so every parameter matters."""
    torch.manual_seed(seed)
    encoder = AttentionHyperEncoder(D, latent_size=8, num_layers=num_layers, num_heads=2, max_subtokens=M)
    with torch.no_grad():
        encoder.proj_out.weight.normal_(std=0.1)
    return encoder


def test_mean_encoder_matches_hand_computation():
    weight = torch.arange(ROWS * D, dtype=torch.float64).view(ROWS, D)
    subtokens = torch.tensor([[3, 7, 0, 0], [5, 0, 0, 0], [1, 2, 3, 4]])
    lengths = torch.tensor([2, 1, 4])
    expected = torch.stack(
        [(weight[3] + weight[7]) / 2, weight[5], (weight[1] + weight[2] + weight[3] + weight[4]) / 4]
    )
    torch.testing.assert_close(MeanHyperEncoder()(subtokens, lengths, weight), expected, rtol=0, atol=0)


def test_fresh_attention_encoder_is_the_masked_mean():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(ROWS, D, generator=generator)
    subtokens, lengths = random_batch(32, generator)
    encoder = build_hyper_encoder("attention", D, M, latent_size=8, num_layers=2, num_heads=2)
    torch.testing.assert_close(
        encoder(subtokens, lengths, weight), MeanHyperEncoder()(subtokens, lengths, weight), rtol=0, atol=1e-6
    )
    # reset_parameters restores that start after anything (e.g. transformers' default init) touched it.
    with torch.no_grad():
        encoder.proj_out.weight.normal_()
    encoder.reset_parameters()
    torch.testing.assert_close(
        encoder(subtokens, lengths, weight), MeanHyperEncoder()(subtokens, lengths, weight), rtol=0, atol=1e-6
    )


@pytest.mark.parametrize("residual", ["first", "last"])
def test_fresh_attention_encoder_is_its_residual(residual):
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(ROWS, D, generator=generator)
    subtokens, lengths = random_batch(32, generator)
    subtokens = fill_padding(subtokens, lengths, generator)
    encoder = build_hyper_encoder("attention", D, M, latent_size=8, num_heads=2, residual=residual)
    pick = torch.zeros_like(lengths) if residual == "first" else lengths - 1
    expected = weight[subtokens[torch.arange(len(lengths)), pick]]
    torch.testing.assert_close(encoder(subtokens, lengths, weight), expected, rtol=0, atol=1e-6)


@settings(max_examples=15, deadline=None, database=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 12), m_pad=st.integers(1, M))
def test_padding_never_changes_a_row(seed, n, m_pad):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(ROWS, D, generator=generator)
    subtokens, lengths = random_batch(n, generator, max_len=m_pad)
    noisy = fill_padding(subtokens, lengths, generator)
    garbage = fill_padding(subtokens, lengths, generator, low=-(10**6), high=10**6)  # out-of-range ids too
    for encoder in (MeanHyperEncoder(), trained_encoder(seed % 7)):
        expected = encoder(subtokens, lengths, weight)
        assert torch.equal(encoder(noisy, lengths, weight), expected)
        assert torch.equal(encoder(garbage, lengths, weight), expected)
        # A row's output does not depend on the other rows of the batch (or on the padded width).
        solo = encoder(subtokens[:1, : int(lengths[0])], lengths[:1], weight)
        torch.testing.assert_close(solo, expected[:1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["mean", "attention"])
def test_empty_batch_and_length_one_rows(kind):
    encoder = trained_encoder() if kind == "attention" else MeanHyperEncoder()
    weight = torch.randn(ROWS, D, requires_grad=True)
    empty = encoder(torch.zeros(0, M, dtype=torch.long), torch.zeros(0, dtype=torch.long), weight)
    assert empty.shape == (0, D) and empty.dtype == weight.dtype
    empty.sum().backward()  # an empty batch still backpropagates (DDP needs every rank to run the encoder)

    subtokens = torch.randint(0, ROWS, (10, 1))
    out = encoder(subtokens, torch.ones(10, dtype=torch.long), weight)
    assert out.shape == (10, D) and torch.isfinite(out).all()
    if kind == "mean":
        torch.testing.assert_close(out, weight[subtokens[:, 0]])


def test_gradient_reaches_every_parameter():
    encoder = trained_encoder(num_layers=2)
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(ROWS, D, generator=generator, requires_grad=True)
    subtokens, lengths = random_batch(16, generator)
    encoder(subtokens, lengths, weight).pow(2).sum().backward()
    for name, parameter in encoder.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    assert weight.grad.abs().sum() > 0


def test_one_training_step_moves_away_from_the_mean():
    torch.manual_seed(0)
    encoder = AttentionHyperEncoder(D, num_layers=1, num_heads=4, max_subtokens=M)
    generator = torch.Generator().manual_seed(2)
    weight = torch.randn(ROWS, D, generator=generator)
    subtokens, lengths = random_batch(16, generator)
    target = torch.randn(16, D, generator=generator)
    optimizer = torch.optim.SGD(encoder.parameters(), lr=0.1)
    torch.nn.functional.mse_loss(encoder(subtokens, lengths, weight), target).backward()
    optimizer.step()
    mean = MeanHyperEncoder()(subtokens, lengths, weight)
    assert (encoder(subtokens, lengths, weight) - mean).abs().max() > 1e-4


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_dtype_follows_the_model(dtype):
    encoder = trained_encoder().to(dtype)
    generator = torch.Generator().manual_seed(3)
    weight = torch.randn(ROWS, D, generator=generator).to(dtype)
    subtokens, lengths = random_batch(8, generator)
    out = encoder(subtokens, lengths, weight)
    assert out.dtype == dtype and torch.isfinite(out).all()
    # Same numbers as in float32, up to the dtype's precision.
    reference = trained_encoder().double()(subtokens, lengths, weight.double())
    torch.testing.assert_close(out.double(), reference, rtol=0.05 if dtype == torch.bfloat16 else 1e-12, atol=0.05)


def test_float32_encoder_next_to_a_bfloat16_table():
    # Mixed precision: the encoder trained in float32 (e.g. PEFT modules_to_save) while the base is bf16.
    encoder = trained_encoder()
    weight = torch.randn(ROWS, D).bfloat16()
    subtokens, lengths = random_batch(8, torch.Generator().manual_seed(4))
    assert encoder(subtokens, lengths, weight).dtype == torch.bfloat16


def test_gradient_checkpointing_matches():
    encoder = trained_encoder(num_layers=2).train()
    generator = torch.Generator().manual_seed(5)
    weight = torch.randn(ROWS, D, generator=generator)
    subtokens, lengths = random_batch(8, generator)
    encoder(subtokens, lengths, weight).sum().backward()
    plain = [p.grad.clone() for p in encoder.parameters()]
    encoder.zero_grad()
    for layer in encoder.layers:  # what PreTrainedModel.gradient_checkpointing_enable sets on every such layer
        layer.gradient_checkpointing = True
        layer._gradient_checkpointing_func = lambda fn, *args: torch.utils.checkpoint.checkpoint(
            fn, *args, use_reentrant=False
        )
    encoder(subtokens, lengths, weight).sum().backward()
    for before, parameter in zip(plain, encoder.parameters(), strict=True):
        torch.testing.assert_close(parameter.grad, before)


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="Unknown hyper-encoder kind 'conv'"):
        build_hyper_encoder("conv", D, M)
    with pytest.raises(ValueError, match="divisible"):
        AttentionHyperEncoder(D, latent_size=10, num_heads=4)
    encoder = AttentionHyperEncoder(D, max_subtokens=2)
    with pytest.raises(ValueError, match="max_subtokens"):
        encoder(torch.zeros(1, 3, dtype=torch.long), torch.ones(1, dtype=torch.long), torch.randn(ROWS, D))
    assert isinstance(build_hyper_encoder("mean", D, M), MeanHyperEncoder)
    with pytest.raises(ValueError, match="residual must be one of"):
        build_hyper_encoder("attention", D, M, residual="max")
    with pytest.raises(ValueError, match="mean hyper-encoder has no residual"):
        build_hyper_encoder("mean", D, M, residual="last")


def reference_forward(encoder, subtokens, lengths, weight):
    """The encoders' formula written plainly (masked_fill and sum, a cloned key mask, the residual by
    gather), as it stood before the forward was cut down to few ops: the oracle of the fast path."""
    import torch.nn.functional as F

    valid = torch.arange(subtokens.shape[1]) < lengths[:, None]
    embeddings = weight[subtokens.masked_fill(~valid, 0)]

    def masked_mean(values):
        accumulate = torch.promote_types(values.dtype, torch.float32)
        total = values.to(accumulate).masked_fill(~valid[..., None], 0).sum(dim=1)
        count = valid.sum(dim=1, keepdim=True).clamp(min=1).to(accumulate)
        return (total / count).to(values.dtype)

    if isinstance(encoder, MeanHyperEncoder):
        return masked_mean(embeddings)
    if encoder.residual == "mean":
        residual = masked_mean(embeddings)
    else:
        first = encoder.residual == "first"
        index = torch.zeros_like(lengths) if first else valid.sum(dim=1).clamp(min=1) - 1
        residual = embeddings.gather(1, index[:, None, None].expand(-1, 1, embeddings.shape[-1]))[:, 0]
    parameter = encoder.proj_in.weight
    hidden = encoder.proj_in(embeddings.to(parameter.dtype)) + encoder.position_embedding[: subtokens.shape[1]]
    key_mask = valid.clone()
    key_mask[:, :1] = True
    for layer in encoder.layers:
        n, m, size = hidden.shape
        qkv = layer.qkv_proj(layer.attention_norm(hidden))
        query, key, value = qkv.view(n, m, 3, layer.num_heads, size // layer.num_heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(query, key, value, attn_mask=key_mask[:, None, None, :])
        hidden = hidden + layer.o_proj(attended.transpose(1, 2).reshape(n, m, size))
        hidden = hidden + layer.down_proj(F.gelu(layer.up_proj(layer.mlp_norm(hidden))))
    correction = encoder.proj_out(masked_mean(encoder.norm(hidden)))
    return residual + correction.to(residual.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, "bf16 table, fp32 encoder"])
@pytest.mark.parametrize("kind", ["mean-encoder", "mean", "first", "last"])
def test_forward_and_gradients_match_the_plain_formula(kind, dtype):
    encoder_dtype = torch.float32 if isinstance(dtype, str) else dtype
    dtype = torch.bfloat16 if isinstance(dtype, str) else dtype
    generator = torch.Generator().manual_seed(6)
    if kind == "mean-encoder":
        encoder = MeanHyperEncoder()
    else:
        torch.manual_seed(6)
        encoder = AttentionHyperEncoder(D, latent_size=8, num_layers=2, num_heads=2, max_subtokens=M, residual=kind)
        with torch.no_grad():
            encoder.proj_out.weight.normal_(std=0.5)
            encoder.proj_out.bias.normal_(std=0.5)
        encoder = encoder.to(encoder_dtype)
    weight = torch.randn(ROWS, D, generator=generator).to(dtype)
    subtokens, lengths = random_batch(40, generator)
    lengths[:3] = torch.tensor([0, -2, M + 3])  # malformed lengths behave as before too
    subtokens = fill_padding(subtokens, lengths.clamp(0, M), generator, low=-(10**6), high=10**6)
    tolerance = {torch.float32: 1e-6, torch.float64: 1e-12, torch.bfloat16: 1e-2}[dtype]

    results, gradients = [], []
    for forward in (encoder, lambda *args: reference_forward(encoder, *args)):
        table = weight.clone().requires_grad_()
        encoder.zero_grad()
        out = forward(subtokens, lengths, table)
        out.pow(2).sum().backward()
        results.append(out)
        gradients.append([table.grad] + [p.grad for p in encoder.parameters()])
    (fast, plain), (fast_gradients, plain_gradients) = results, gradients
    assert fast.dtype == plain.dtype == dtype and fast.shape == plain.shape == (40, D)
    torch.testing.assert_close(fast, plain, rtol=tolerance, atol=tolerance)
    for fast_gradient, plain_gradient in zip(fast_gradients, plain_gradients, strict=True):
        scale = plain_gradient.abs().max().item() or 1.0
        torch.testing.assert_close(fast_gradient / scale, plain_gradient / scale, rtol=0, atol=10 * tolerance)
