"""The decoder-only Transformer encoder (Baevski & Auli 2019, section 4.1)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from reglm.config import ModelConfig, build_config
from reglm.encoders import ENCODERS
from reglm.encoders.transformer import (
    TransformerBlock,
    TransformerConfig,
    TransformerEncoder,
    sinusoidal_positions,
)
from reglm.errors import ReglmError
from reglm.models import LanguageModel

TIGHT = {"rtol": 1e-5, "atol": 1e-5}
SMALL = {
    "encoder": "transformer",
    "encoder__d_model": 16,
    "encoder__layers": 2,
    "encoder__heads": 4,
    "encoder__ffn_dim": 24,
    "emb_size": 16,
}


def _encoder(input_size: int = 16, **options: object) -> TransformerEncoder:
    cfg = TransformerConfig(**{"d_model": 16, "layers": 2, "heads": 4, "ffn_dim": 24, **options})
    return TransformerEncoder.from_config(cfg, input_size)


# ------------------------------------------------------------------ a slow, independent reference


def _layer_norm(x: torch.Tensor, norm: torch.nn.LayerNorm) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias


def _reference_attention(x: torch.Tensor, block: TransformerBlock) -> torch.Tensor:
    """Explicit per-head attention with a causal mask, from the block's weights."""
    e, heads = block.attn.d_model, block.attn.heads
    d = e // heads
    w, b = block.attn.qkv.weight, block.attn.qkv.bias
    T = x.size(1)
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    outs = []
    for h in range(heads):
        rows = slice(h * d, (h + 1) * d)
        q = x @ w[:e][rows].T + b[:e][rows]
        k = x @ w[e : 2 * e][rows].T + b[e : 2 * e][rows]
        v = x @ w[2 * e :][rows].T + b[2 * e :][rows]
        scores = (q @ k.transpose(1, 2)) / math.sqrt(d)
        scores = scores.masked_fill(~mask, float("-inf"))
        outs.append(torch.softmax(scores, dim=-1) @ v)
    return torch.cat(outs, dim=-1) @ block.attn.out.weight.T + block.attn.out.bias


def _reference_encoder(x: torch.Tensor, enc: TransformerEncoder) -> tuple[torch.Tensor, list[torch.Tensor]]:
    e = enc.d_model
    if enc.cfg.scale_input:
        x = x * math.sqrt(e)
    if enc.input_proj is not None:
        x = x @ enc.input_proj.weight.T
    T = x.size(1)
    pos = torch.zeros(T, e)
    half = e // 2
    for p in range(T):
        for i in range(half):
            angle = p / 10000 ** (i / (half - 1))
            pos[p, i], pos[p, half + i] = math.sin(angle), math.cos(angle)
    x = x + pos
    layers = []
    for block in enc.blocks:
        x = x + _reference_attention(_layer_norm(x, block.attn_norm), block)
        h = torch.relu(_layer_norm(x, block.ffn_norm) @ block.fc1.weight.T + block.fc1.bias)
        x = x + h @ block.fc2.weight.T + block.fc2.bias
        layers.append(x)
    if enc.final_norm is not None:
        x = _layer_norm(x, enc.final_norm)
    if enc.output_proj is not None:
        x = x @ enc.output_proj.weight.T
    return x, layers


@pytest.mark.parametrize("options", [{}, {"final_norm": False, "scale_input": False}, {"output_dim": 7}])
@pytest.mark.parametrize("input_size", [16, 10])
def test_equals_slow_reference_in_eval_mode(options: dict, input_size: int) -> None:
    enc = _encoder(input_size, dropout=0.3, attention_dropout=0.2, relu_dropout=0.1, **options).eval()
    with torch.no_grad():  # non-trivial LayerNorm parameters, so the reference checks their use too
        for p in enc.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(3, 9, input_size)
    out = enc(x)
    ref, ref_layers = _reference_encoder(x, enc)
    torch.testing.assert_close(out.output, ref, **TIGHT)
    assert out.raw_output is out.output and out.state is None
    assert len(out.layer_outputs) == 2
    for a, b in zip(out.layer_outputs, ref_layers):
        torch.testing.assert_close(a, b, **TIGHT)


# ------------------------------------------------------------------ causality


def test_future_tokens_never_change_earlier_log_probs() -> None:
    model = LanguageModel(
        ModelConfig.build(**SMALL, encoder__dropout=0.2, encoder__attention_dropout=0.2), vocab_size=30
    ).eval()
    ids = torch.randint(0, 30, (2, 12))
    base, state = model.log_probs(ids)
    assert state is None
    for t in (0, 5, 11):
        changed = ids.clone()
        changed[:, t] = (changed[:, t] + 7) % 30
        logp, _ = model.log_probs(changed)
        torch.testing.assert_close(logp[:, :t], base[:, :t], rtol=0, atol=1e-6)
        assert not torch.allclose(logp[:, t], base[:, t])


def test_config_builder_accepts_the_transformer() -> None:
    cfg = build_config(
        None,
        ["model.encoder=transformer", "model.encoder.d_model=24", "model.encoder.heads=3", "model.input.emb_size=24"],
    )
    assert (
        isinstance(cfg.model.encoder, TransformerConfig)
        and cfg.model.encoder.d_model == 24
        and cfg.model.encoder.heads == 3
    )
    assert ENCODERS["transformer"] is TransformerEncoder


def test_gradient_of_an_output_never_reaches_future_inputs() -> None:
    enc = _encoder().train()  # dropout 0.1 on input and sub-blocks: masks act per position, still causal
    x = torch.randn(2, 10, 16, requires_grad=True)
    out = enc(x).output
    (out[:, 4] * torch.randn(2, 16)).sum().backward()
    assert x.grad[:, 5:].abs().max() == 0
    assert x.grad[:, :5].norm(dim=-1).gt(1e-4).all()


# ------------------------------------------------------------------ pieces


def test_sinusoids_follow_the_formula() -> None:
    for dim in (16, 7, 2):
        table = sinusoidal_positions(20, dim)
        half = dim // 2
        assert table.shape == (20, dim)
        for p in (0, 1, 13, 19):
            for i in range(half):
                angle = p * math.exp(-math.log(10000) * i / max(half - 1, 1))
                assert table[p, i].item() == pytest.approx(math.sin(angle), abs=1e-5)
                assert table[p, half + i].item() == pytest.approx(math.cos(angle), abs=1e-5)
        if dim % 2:
            assert table[:, -1].abs().max() == 0
    # positions are 0-based: the first token gets sin(0) = 0, cos(0) = 1
    assert torch.equal(sinusoidal_positions(1, 8), torch.tensor([[0.0] * 4 + [1.0] * 4]))


def test_position_table_is_cached_and_grown() -> None:
    enc = _encoder()
    a = enc.positions(10, torch.device("cpu"), torch.float32)
    b = enc.positions(300, torch.device("cpu"), torch.float32)
    torch.testing.assert_close(b[:10], a, rtol=0, atol=0)
    torch.testing.assert_close(b, sinusoidal_positions(300, 16), rtol=0, atol=0)
    assert enc.positions(5, torch.device("cpu"), torch.float32).data_ptr() == b.data_ptr()


def test_dropout_is_identity_in_eval_mode() -> None:
    dropped = _encoder(dropout=0.5, attention_dropout=0.5, relu_dropout=0.5)
    plain = _encoder(dropout=0.0)
    plain.load_state_dict(dropped.state_dict())
    x = torch.randn(2, 8, 16)
    dropped.eval(), plain.eval()
    torch.testing.assert_close(dropped(x).output, plain(x).output, rtol=0, atol=0)
    torch.testing.assert_close(dropped(x).output, dropped(x).output, rtol=0, atol=0)
    dropped.train()
    assert not torch.allclose(dropped(x).output, plain(x).output)


def test_projections_appear_exactly_when_sizes_differ() -> None:
    same = _encoder(16)
    assert same.input_proj is None and same.output_proj is None and same.output_size == 16
    assert _encoder(16, output_dim=16).output_proj is None
    enc = _encoder(10, output_dim=6)
    assert enc.input_proj.weight.shape == (16, 10) and enc.input_proj.bias is None
    assert enc.output_proj.weight.shape == (6, 16) and enc.output_proj.bias is None
    assert enc.output_size == 6 and enc.layer_sizes == [16, 16]
    assert enc(torch.randn(2, 5, 10)).output.shape == (2, 5, 6)
    cfg = TransformerConfig(d_model=16, heads=4, output_dim=6)
    assert cfg.output_size(10) == 6 and TransformerConfig(d_model=16, heads=4).output_size(10) == 16
    # section 4.1 in a whole model: embeddings of 8, e = 16, projected back to 8 for a tied softmax
    model = LanguageModel(ModelConfig.build(**{**SMALL, "emb_size": 8}, encoder__output_dim=8), vocab_size=20)
    assert model.output.weight is model.embedding.weight
    assert model.log_probs(torch.randint(0, 20, (2, 4)))[0].shape == (2, 4, 20)


def test_block_parameter_count_closed_form() -> None:
    for e, heads, ff in ((16, 4, 24), (12, 3, 40)):
        block = TransformerBlock(e, heads, ff, 0.1, 0.1, 0.1)
        assert sum(p.numel() for p in block.parameters()) == 4 * (e * e + e) + 2 * e * ff + ff + e + 4 * e
    enc = _encoder(10, output_dim=6)  # + input and output projections, final norm
    block = 4 * (16 * 16 + 16) + 2 * 16 * 24 + 24 + 16 + 4 * 16
    assert sum(p.numel() for p in enc.parameters()) == 10 * 16 + 2 * block + 2 * 16 + 16 * 6


def test_initialization_is_xavier_with_zero_biases() -> None:
    enc = _encoder(input_size=16, d_model=64, heads=4, ffn_dim=128)
    qkv = enc.blocks[0].attn.qkv
    bound = math.sqrt(6 / (64 + 3 * 64))
    assert qkv.weight.abs().max() <= bound and qkv.weight.abs().max() > 0.9 * bound
    assert qkv.bias.abs().max() == 0 and enc.blocks[0].fc1.bias.abs().max() == 0


def test_stateless_interface() -> None:
    enc = _encoder()
    assert enc.init_state(3, "cpu") is None
    assert enc.load_state(None) is None
    with pytest.raises(ValueError):
        enc.load_state([torch.zeros(1)])
    with pytest.raises(ValueError):
        enc(torch.randn(1, 3, 16), state=object())


@pytest.mark.parametrize(
    "options",
    [
        {"heads": 5},
        {"layers": 0},
        {"d_model": 0},
        {"ffn_dim": 0},
        {"dropout": 1.0},
        {"attention_dropout": -0.1},
        {"relu_dropout": 1.5},
        {"output_dim": 0},
    ],
)
def test_config_validation(options: dict) -> None:
    with pytest.raises(ReglmError):
        TransformerConfig(**{"d_model": 16, "heads": 4, **options})


def test_cpu_bf16_autocast_runs() -> None:
    enc = _encoder(10).eval()
    x = torch.randn(2, 6, 10)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = enc(x).output
    assert torch.isfinite(out.float()).all()
    torch.testing.assert_close(out.float(), enc(x).output, rtol=0.1, atol=0.1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_autocast_matches_fp32() -> None:
    enc = _encoder(10, dropout=0.1, attention_dropout=0.1).cuda().eval()
    x = torch.randn(2, 33, 10, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = enc(x)
    assert out.output.dtype == torch.float32  # the final LayerNorm is kept in fp32
    torch.testing.assert_close(out.output, enc(x).output, rtol=0.05, atol=0.05)
    enc.train()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        enc(x).output.float().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in enc.parameters())


# ------------------------------------------------------------------ end to end


def test_tiny_transformer_trains_one_epoch(tmp_path: Path) -> None:
    from reglm.train.run import train

    overrides = [
        "model.encoder=transformer",
        "model.encoder.d_model=16",
        "model.encoder.layers=2",
        "model.encoder.heads=2",
        "model.encoder.ffn_dim=32",
        "model.input.emb_size=16",
        "train.epochs=1",
        "train.finetune=false",
        "data.synthetic_sentences=100",
    ]
    results = train(build_config("tiny", overrides), tmp_path / "run", progress=False)
    for split in ("valid", "test"):
        assert math.isfinite(results[split]["ppl"]) and results[split]["ppl"] > 1
