"""The character-CNN input layer (Baevski & Auli 2019, section 4.4; Kim et al. 2016)."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from reglm.config import ModelConfig, build_config
from reglm.data.vocab import Vocab
from reglm.errors import ReglmError
from reglm.inputs import INPUTS
from reglm.inputs.char_cnn import CharCNN, CharCNNConfig, Highway, parse_filters, spell
from reglm.models import LanguageModel, count_parameters

SMALL = {"char_emb_size": 6, "filters": "1:4,2:5,3:7", "highway": 2, "dim": 9, "max_chars": 10}
WORDS = ["<eos>", "<unk>", "the", "cat", "caterpillar", "caterpillars", "naïve", "a"]


def _vocab(words: list[str] = WORDS) -> Vocab:
    return Vocab(list(words), [1] * len(words))


def _layer(words: list[str] = WORDS, **options: object) -> CharCNN:
    return CharCNN.from_config(CharCNNConfig(**{**SMALL, **options}), len(words), _vocab(words))


def _closed_form(char_emb: int, filters: list[tuple[int, int]], highway: int, dim: int, alphabet: int = 257) -> int:
    F_ = sum(c for _, c in filters)
    return (
        alphabet * char_emb
        + sum(w * char_emb * c + c for w, c in filters)
        + highway * (2 * F_ * F_ + 2 * F_)
        + F_ * dim
        + dim
    )


def test_parameter_count_closed_form_at_the_papers_filters() -> None:
    cfg = CharCNNConfig(dim=1024, highway=2)
    filters = [(1, 128), (2, 256), (3, 384), (4, 512), (5, 512), (6, 512), (7, 512)]
    assert cfg.filter_list == tuple(filters) and cfg.features == 2816 and cfg.char_emb_size == 128 and cfg.highway == 2
    with torch.device("meta"):
        layer = CharCNN.from_config(cfg, 100_000, None)
    n = sum(p.numel() for p in layer.parameters())
    assert n == _closed_form(128, filters, 2, 1024)
    assert n == 257 * 128 + 1_673_984 + 2 * (2 * 2816**2 + 2 * 2816) + 2816 * 1024 + 1024
    # independent of the vocabulary
    with torch.device("meta"):
        assert sum(p.numel() for p in CharCNN.from_config(cfg, 10, None).parameters()) == n


def test_parameter_count_small_and_in_a_model() -> None:
    layer = _layer()
    assert sum(p.numel() for p in layer.parameters()) == _closed_form(6, [(1, 4), (2, 5), (3, 7)], 2, 9)
    cfg = ModelConfig.build(
        input="char-cnn", **{f"input__{k}": v for k, v in SMALL.items()}, hidden_size=12, tie_weights=False
    )
    model = LanguageModel(cfg, len(WORDS), _vocab())
    assert count_parameters(cfg, len(WORDS)) == model.num_parameters()
    assert model.parameter_split()["input"] == _closed_form(6, [(1, 4), (2, 5), (3, 7)], 2, 9)


def test_spellings_are_utf8_bytes_truncated_and_padded() -> None:
    table = spell(["<unk>", "naïve", "abcdefghijkl", ""], 8)
    assert table.dtype == torch.int16 and table.shape == (4, 8)
    assert table[0].tolist() == [1 + b for b in b"<unk>"] + [0, 0, 0]
    assert table[1].tolist() == [1 + b for b in "naïve".encode()] + [0, 0]  # ï is two bytes
    assert table[2].tolist() == [1 + b for b in b"abcdefgh"]
    assert table[3].tolist() == [0] * 8
    layer = _layer()
    assert layer.spellings.shape == (len(WORDS), 10)
    torch.testing.assert_close(layer.spellings, spell(WORDS, 10), rtol=0, atol=0)


def test_same_spelling_prefix_gives_the_same_vector() -> None:
    words = ["<eos>", "caterpillar", "caterpillars", "caterpilla", "dog"]
    layer = _layer(words, max_chars=10).eval()
    out = layer(torch.tensor([[1, 2, 3, 4]]))
    torch.testing.assert_close(out[0, 0], out[0, 1], rtol=0, atol=0)
    torch.testing.assert_close(out[0, 0], out[0, 2], rtol=0, atol=0)
    assert not torch.allclose(out[0, 0], out[0, 3])
    longer = _layer(words, max_chars=12).eval()
    out = longer(torch.tensor([[1, 2]]))
    assert not torch.allclose(out[0, 0], out[0, 1])


def _reference(layer: CharCNN, word: int) -> torch.Tensor:
    """One word, step by step: embeddings, every window of every filter, max, ReLU, highway, projection."""
    chars = layer.chars.weight[layer.spellings[word].long()]  # (C, E)
    pooled = []
    for conv in layer.convs:
        w = conv.weight.shape[-1]
        windows = torch.stack(
            [(chars[i : i + w].T * conv.weight).sum(dim=(1, 2)) + conv.bias for i in range(chars.size(0) - w + 1)]
        )
        pooled.append(windows.max(dim=0).values)
    y = torch.relu(torch.cat(pooled))
    for hw in layer.highways:
        F_ = y.numel()
        t = hw.linear.weight[:F_] @ y + hw.linear.bias[:F_]
        g = torch.sigmoid(hw.linear.weight[F_:] @ y + hw.linear.bias[F_:])
        y = g * torch.relu(t) + (1 - g) * y
    return layer.proj.weight @ y + layer.proj.bias


def test_forward_equals_a_per_word_reference_and_has_the_right_shape() -> None:
    layer = _layer().eval()
    ids = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7], [2, 2, 7, 0]])
    out = layer(ids)
    assert out.shape == (3, 4, 9)
    for b in range(3):
        for t in range(4):
            torch.testing.assert_close(out[b, t], _reference(layer, int(ids[b, t])), rtol=1e-5, atol=1e-5)


def test_highway_formula() -> None:
    hw = Highway(5)
    x = torch.randn(3, 5)
    t, g = (x @ hw.linear.weight.T + hw.linear.bias).split(5, dim=-1)
    torch.testing.assert_close(hw(x), torch.sigmoid(g) * F.relu(t) + (1 - torch.sigmoid(g)) * x)
    assert hw.linear.bias[:5].abs().max() == 0 and torch.all(hw.linear.bias[5:] == -1.0)


def test_padding_character_is_zero_and_untrained() -> None:
    layer = _layer().train()
    assert layer.chars.weight[0].abs().max() == 0
    layer(torch.tensor([[2, 3, 4]])).sum().backward()
    assert layer.chars.weight.grad[0].abs().max() == 0
    assert layer.chars.weight.grad[1 + ord("c")].abs().max() > 0


def test_noise_only_in_training() -> None:
    layer = _layer()
    ids = torch.tensor([[2, 3]])
    layer.eval()
    torch.testing.assert_close(layer(ids, noise_std=0.5), layer(ids), rtol=0, atol=0)
    layer.train()
    assert not torch.allclose(layer(ids, noise_std=0.5), layer(ids))


def test_placeholder_without_vocabulary_and_loading_restores_spellings() -> None:
    cfg = CharCNNConfig(**SMALL)
    blank = CharCNN.from_config(cfg, len(WORDS), None)
    assert blank.spellings.shape == (len(WORDS), 10) and blank.spellings.abs().max() == 0
    with pytest.raises(ReglmError, match="without a vocabulary"):
        blank(torch.tensor([[1]]))
    real = _layer().eval()
    blank.load_state_dict(real.state_dict())
    ids = torch.tensor([[1, 4, 6]])
    torch.testing.assert_close(blank.eval()(ids), real(ids), rtol=0, atol=0)


def test_saved_model_reloads_with_the_same_spellings(tmp_path: Path) -> None:
    from reglm.modeldir import load_model_dir, save_model_dir

    overrides = [
        "model.input=char-cnn",
        *(f"model.input.{k}={v}" for k, v in SMALL.items()),
        "model.output.tie_weights=false",
        "model.encoder.hidden_size=8",
    ]
    config = build_config(None, overrides)
    vocab = Vocab.build(Counter({w: 10 - i for i, w in enumerate(WORDS)}))
    model = LanguageModel(config.model, len(vocab), vocab).eval()
    save_model_dir(tmp_path / "m", model, config, vocab)
    loaded, _, loaded_vocab = load_model_dir(tmp_path / "m")
    assert loaded_vocab.itos == vocab.itos
    torch.testing.assert_close(loaded.embedding.spellings, model.embedding.spellings, rtol=0, atol=0)
    ids = torch.randint(0, len(vocab), (2, 5))
    torch.testing.assert_close(loaded.eval().log_probs(ids)[0], model.log_probs(ids)[0], rtol=0, atol=0)


@pytest.mark.parametrize("output", ["softmax", "mos"])
def test_a_tied_output_layer_refuses_the_char_cnn(output: str) -> None:
    with pytest.raises(ReglmError, match="tie_weights"):
        ModelConfig.build(input="char-cnn", output=output, tie_weights=True)
    ModelConfig.build(
        input="char-cnn", output=output, tie_weights=False, **({"n_experts": 2} if output == "mos" else {})
    )


@pytest.mark.parametrize(
    "options, option",
    [
        ({"filters": "1:128,2"}, "filters"),
        ({"filters": "0:5"}, "filters"),
        ({"filters": "a:b"}, "filters"),
        ({"filters": ""}, "filters"),
        ({"max_chars": 6}, "max_chars"),
        ({"highway": -1}, "highway"),
        ({"dim": 0}, "dim"),
        ({"char_emb_size": 0}, "char_emb_size"),
    ],
)
def test_config_validation(options: dict, option: str) -> None:
    with pytest.raises(ReglmError, match=f"model.input.{option}"):
        CharCNNConfig(**options)


def test_registered_and_filters_parse() -> None:
    assert INPUTS["char-cnn"] is CharCNN
    assert parse_filters(" 1:3, 2:4 ") == ((1, 3), (2, 4))
    assert CharCNNConfig().output_size == 512


def test_tiny_char_cnn_model_trains_one_epoch(tmp_path: Path) -> None:
    from reglm.train.run import train

    overrides = [
        "model.input=char-cnn",
        "model.input.char_emb_size=8",
        "model.input.filters=1:8,2:8,3:8",
        "model.input.dim=16",
        "model.input.max_chars=12",
        "model.output.tie_weights=false",
        "train.epochs=1",
        "train.finetune=false",
        "data.synthetic_sentences=100",
    ]
    results = train(build_config("tiny", overrides), tmp_path / "run", progress=False)
    for split in ("valid", "test"):
        assert math.isfinite(results[split]["ppl"]) and results[split]["ppl"] > 1
