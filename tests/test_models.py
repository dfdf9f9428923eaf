"""The assembled language model: tying, dropout switches, state handling, safetensors round trip."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_model, save_model

from reglm.config import ModelConfig
from reglm.encoders.base import detach_state
from reglm.models import LanguageModel

V = 40


def _cfg(**kw) -> ModelConfig:
    base = dict(
        emb_size=8,
        hidden_size=12,
        num_layers=3,
        embed_dropout=0.1,
        input_dropout=0.3,
        hidden_dropout=0.2,
        output_dropout=0.3,
        weight_dropout=0.5,
    )
    base.update(kw)
    return ModelConfig.build(**base)


NO_DROPOUT = dict(embed_dropout=0.0, input_dropout=0.0, hidden_dropout=0.0, output_dropout=0.0, weight_dropout=0.0)


def test_shapes_and_normalization() -> None:
    model = LanguageModel(_cfg(), V).eval()
    ids = torch.randint(0, V, (3, 5))
    out = model(ids)
    assert out.output.shape == (3, 5, 8)
    lp, state = model.log_probs(ids)
    assert lp.shape == (3, 5, V) and len(state.layers) == 3
    torch.testing.assert_close(lp.exp().sum(-1), torch.ones(3, 5), rtol=0, atol=1e-5)
    targets = torch.randint(0, V, (3, 5))
    nll, _ = model.nll(ids, targets)
    assert nll.shape == (3, 5)
    torch.testing.assert_close(nll, -lp.gather(-1, targets.unsqueeze(-1)).squeeze(-1), rtol=1e-5, atol=1e-6)


def test_embedding_init_range() -> None:
    model = LanguageModel(_cfg(init_range=0.05), 500)
    w = model.embedding.weight
    assert w.abs().max() <= 0.05 and w.abs().max() > 0.045


def test_tied_and_untied_parameters() -> None:
    tied = LanguageModel(_cfg(), V)
    untied = LanguageModel(_cfg(tie_weights=False), V)
    assert tied.output.weight is tied.embedding.weight
    assert untied.output.weight is not untied.embedding.weight
    assert untied.num_parameters() - tied.num_parameters() == V * 8
    expected = sum(p.numel() for name, p in untied.named_parameters())
    assert untied.num_parameters() == expected


def test_tied_weights_survive_safetensors_round_trip(tmp_path: Path) -> None:
    model = LanguageModel(_cfg(), V).eval()
    path = tmp_path / "model.safetensors"
    save_model(model, str(path))
    torch.manual_seed(99)
    loaded = LanguageModel(_cfg(), V).eval()
    assert not torch.equal(loaded.embedding.weight, model.embedding.weight)
    load_model(loaded, str(path))
    assert loaded.output.weight is loaded.embedding.weight
    assert loaded.output.weight.data_ptr() == loaded.embedding.weight.data_ptr()
    ids = torch.randint(0, V, (2, 6))
    torch.testing.assert_close(loaded.log_probs(ids)[0], model.log_probs(ids)[0], rtol=0, atol=0)
    # An update to one is an update to the other.
    with torch.no_grad():
        loaded.embedding.weight[5].add_(1.0)
    torch.testing.assert_close(loaded.output.weight[5], model.embedding.weight[5] + 1.0)


def test_eval_mode_is_deterministic() -> None:
    model = LanguageModel(_cfg(), V).eval()
    ids = torch.randint(0, V, (4, 7))
    torch.testing.assert_close(model(ids).output, model(ids).output, rtol=0, atol=0)
    model.train()
    assert not torch.allclose(model(ids).output, model(ids).output)


def test_zero_dropout_training_equals_eval() -> None:
    model = LanguageModel(_cfg(**NO_DROPOUT), V)
    ids = torch.randint(0, V, (4, 7))
    train_out = model.train()(ids)
    eval_out = model.eval()(ids)
    torch.testing.assert_close(train_out.output, eval_out.output, rtol=0, atol=0)
    torch.testing.assert_close(train_out.raw_output, eval_out.raw_output, rtol=0, atol=0)


def test_embedding_dropout_drops_word_types_in_the_model() -> None:
    model = LanguageModel(_cfg(**{**NO_DROPOUT, "embed_dropout": 0.5}), V).train()
    seen = []
    model.encoder.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    ids = torch.arange(V).repeat(2, 2)  # every word four times
    model(ids)
    emb = seen[0]
    dropped = (emb == 0).all(-1)
    assert dropped.any() and (~dropped).any()
    for word in range(V):
        positions = ids == word
        assert dropped[positions].all() or not dropped[positions].any()
        if not dropped[positions].any():
            torch.testing.assert_close(emb[positions], (model.embedding.weight[word] / 0.5).expand(4, -1))


def test_state_is_carried_and_detached() -> None:
    model = LanguageModel(_cfg(**NO_DROPOUT), V).eval()
    ids = torch.randint(0, V, (2, 10))
    targets = torch.randint(0, V, (2, 10))
    full, _ = model.nll(ids, targets)
    state = model.init_state(2)
    assert [tuple(h.shape) for h, _ in state.layers] == [(1, 2, 12), (1, 2, 12), (1, 2, 8)]
    pieces = []
    for start, stop in ((0, 3), (3, 7), (7, 10)):
        nll, state = model.nll(ids[:, start:stop], targets[:, start:stop], state)
        state = detach_state(state)
        assert all(not h.requires_grad for h, _ in state.layers)
        pieces.append(nll)
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-6)


def test_training_step_reaches_every_parameter() -> None:
    model = LanguageModel(_cfg(), V).train()
    ids = torch.randint(0, V, (3, 6))
    nll, _ = model.nll(ids, torch.randint(0, V, (3, 6)))
    nll.mean().backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_rejects_empty_vocabulary() -> None:
    with pytest.raises(ValueError):
        LanguageModel(_cfg(), 0)
