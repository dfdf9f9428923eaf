"""Adaptive input embeddings (Baevski & Auli 2019, section 3)."""

from __future__ import annotations

import pytest
import torch

from reglm.config import build_config
from reglm.errors import ReglmError
from reglm.inputs import INPUTS
from reglm.inputs.adaptive_input import AdaptiveInput, AdaptiveInputConfig
from reglm.models import LanguageModel

V, D, CUTOFFS, K = 50, 16, (10, 30), 2.0


def slow_reference(layer: AdaptiveInput, ids: torch.Tensor) -> torch.Tensor:
    """Per token: find the band by scanning its bounds, look up, project."""
    out = torch.empty(*ids.shape, layer.dim)
    for pos in range(ids.numel()):
        word = int(ids.reshape(-1)[pos])
        band = next(i for i in range(layer.num_bands) if layer.bounds[i] <= word < layer.bounds[i + 1])
        emb = layer.weights[band][word - layer.bounds[band]]
        out.view(-1, layer.dim)[pos] = layer.projections[band] @ emb
    return out


def test_band_shapes_dimensions_and_no_bias() -> None:
    layer = AdaptiveInput(V, D, CUTOFFS, K)
    assert layer.dims == (16, 8, 4) and layer.output_size == D
    assert [tuple(w.shape) for w in layer.weights] == [(10, 16), (20, 8), (20, 4)]
    assert [tuple(p.shape) for p in layer.projections] == [(16, 16), (16, 8), (16, 4)]
    assert sum(p.numel() for p in layer.parameters()) == sum(w.numel() + p.numel() for w, p in layer.band_weights())
    for (emb, proj), w, p in zip(layer.band_weights(), layer.weights, layer.projections):
        assert emb is w and proj is p


def test_forward_matches_a_per_token_reference_in_the_original_order() -> None:
    layer = AdaptiveInput(V, D, CUTOFFS, K).eval()
    ids = torch.randint(0, V, (3, 11))
    ids[0, :3] = torch.tensor([0, 10, 49])  # every band, and its edges
    ids[1, :3] = torch.tensor([9, 29, 30])
    out = layer(ids)
    assert out.shape == (3, 11, D)
    torch.testing.assert_close(out, slow_reference(layer, ids), rtol=1e-5, atol=1e-6)


def test_forward_with_only_some_bands_present_and_gradients_reach_only_the_used_rows() -> None:
    layer = AdaptiveInput(V, D, CUTOFFS, K)
    ids = torch.tensor([[12, 3, 12, 25]])  # bands 1 and 2; band 3 absent
    torch.testing.assert_close(layer(ids), slow_reference(layer, ids), rtol=1e-5, atol=1e-6)
    layer(ids).sum().backward()
    assert layer.weights[2].grad is None and layer.projections[2].grad is None
    rows = layer.weights[1].grad.abs().sum(-1).nonzero().flatten().tolist()
    assert rows == [2, 15]
    assert layer.weights[0].grad.abs().sum(-1).nonzero().flatten().tolist() == [3]


def test_initialization_follows_the_authors_code() -> None:
    layer = AdaptiveInput(2000, 64, (500, 1000), 4.0)
    for weight, d_i in zip(layer.weights, layer.dims):
        assert abs(float(weight.detach().std()) - d_i**-0.5) < 0.1 * d_i**-0.5
    for proj in layer.projections:
        bound = (6 / (proj.shape[0] + proj.shape[1])) ** 0.5
        assert float(proj.detach().abs().max()) <= bound


def test_dropout_and_noise_only_in_training() -> None:
    layer = AdaptiveInput(V, D, CUTOFFS, K, dropout=0.5)
    ids = torch.randint(0, V, (4, 6))
    clean = layer.eval()(ids, noise_std=1.0)
    torch.testing.assert_close(clean, layer.embed(ids))
    train = layer.train()(ids)
    dropped = (train == 0).all(dim=1)  # locked dropout: whole features of a sequence
    assert dropped.any() and not torch.equal(train, clean)


def test_registered_and_built_from_overrides() -> None:
    assert INPUTS["adaptive"] is AdaptiveInput
    config = build_config(
        None,
        [
            "model.input=adaptive",
            "model.input.dim=16",
            "model.input.cutoffs=10,30",
            "model.input.factor=2",
            "model.output=adaptive",
            "model.output.cutoffs=10,30",
            "model.output.factor=2",
        ],
    )
    assert isinstance(config.model.input, AdaptiveInputConfig) and config.model.input.cutoff_values == (10, 30)
    model = LanguageModel(config.model, V)
    assert isinstance(model.embedding, AdaptiveInput) and model.embedding.dims == (16, 8, 4)
    out = model(torch.randint(0, V, (2, 5)))
    assert out.output.shape == (2, 5, 16)


BASE = ["model.input=adaptive", "model.input.dim=16", "model.output=adaptive", "model.output.tie=none"]


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (["model.input.cutoffs=30,10"], "invalid option model.input.cutoffs: .*strictly increasing"),
        (["model.input.cutoffs=10,10"], "invalid option model.input.cutoffs: .*strictly increasing"),
        (["model.input.cutoffs=0,10"], "invalid option model.input.cutoffs"),
        (["model.input.cutoffs=ten"], "invalid option model.input.cutoffs"),
        (["model.input.cutoffs=10,20,30", "model.input.factor=4"], "invalid option model.input.factor: band 4 of 4"),
        (["model.input.factor=0.5"], "invalid option model.input.factor"),
        (["model.input.dropout=1.0"], "invalid option model.input.dropout"),
    ],
)
def test_bad_options_are_config_errors(overrides: list[str], fragment: str) -> None:
    with pytest.raises(ReglmError, match=fragment):
        build_config(None, [*BASE, "model.output.cutoffs=10,30", *overrides])


def test_cutoffs_beyond_the_vocabulary_are_a_config_error_at_build_time() -> None:
    config = build_config(None, [*BASE, "model.input.cutoffs=10,50", "model.output.cutoffs=10,30"])
    with pytest.raises(ReglmError, match="invalid option model.input.cutoffs: .*beyond the vocabulary of 50 words"):
        LanguageModel(config.model, 50)
