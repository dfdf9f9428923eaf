"""The neural cache (Grave et al. 2017; AWD-LSTM section 7) and the word-level output files.

The vectorized cache is checked against a straightforward per-token implementation kept here,
which runs the model over each whole stream in one call and builds every position's cache
distribution by a Python loop over its window.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch

from reglm.config import ModelConfig
from reglm.data.vocab import EOS, Vocab
from reglm.errors import ReglmError
from reglm.evaluate.cache import (
    DEFAULT_GRID,
    DEFAULT_SPEC,
    CacheGrid,
    CacheSpec,
    cache_distribution,
    cache_evaluate,
    cache_search,
    parse_cache_grid,
    parse_cache_spec,
)
from reglm.evaluate.perplexity import evaluate
from reglm.evaluate.word_probs import loss_deltas, write_loss_deltas, write_word_probs
from reglm.models import LanguageModel

V = 11


@pytest.fixture(scope="module")
def model() -> LanguageModel:
    """A small random-weight model; init_range 0.5 spreads its hidden states so the attention matters."""
    torch.manual_seed(1)
    return LanguageModel(ModelConfig.build(emb_size=8, hidden_size=12, num_layers=2, init_range=0.5), V).eval()


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    """A stream with repeats (what a cache exploits): random words and copied stretches."""
    gen = torch.Generator().manual_seed(2)
    parts = []
    for _ in range(12):
        piece = torch.randint(0, V, (int(torch.randint(3, 12, (1,), generator=gen)),), generator=gen)
        parts += [piece, piece[: len(piece) // 2]]
    return torch.cat(parts)


@pytest.fixture(scope="module")
def vocab() -> Vocab:
    return Vocab([EOS, *(f"w{i}" for i in range(1, V))], [1] * V)


def streams_of(ids: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """The evaluation's streams: the N - 1 targets dealt into ``batch_size`` contiguous runs (the
    first ``(N - 1) mod B`` one longer), each starting on the token before its first target."""
    q, r = divmod(ids.numel() - 1, batch_size)
    streams, first = [], 1
    for b in range(batch_size):
        n = q + (b < r)
        streams.append(ids[first - 1 : first + n])
        first += n
    return streams


@torch.no_grad()
def reference_cache_nll(model: LanguageModel, ids: torch.Tensor, spec: CacheSpec, batch_size: int) -> torch.Tensor:
    """Per-token mixture NLL of every target in stream order, one position at a time (float64 mixing)."""
    rows = []
    for row in streams_of(ids, batch_size):
        x, y = row[:-1], row[1:]
        out = model(x.unsqueeze(0))
        h = out.output[0]
        p_model = model.output.predict(out)[0].double().exp()
        nll = []
        for t in range(y.numel()):
            first = max(0, t - spec.window)
            p = p_model[t]
            if t > first:
                attention = torch.softmax(spec.theta * (h[first:t] @ h[t]).double(), dim=0)
                p_cache = torch.zeros(V, dtype=torch.float64)
                for weight, word in zip(attention, y[first:t].tolist()):
                    p_cache[word] += weight
                p = (1 - spec.lam) * p + spec.lam * p_cache
            nll.append(-math.log(p[y[t]]))
        rows.extend(nll)
    return torch.tensor(rows, dtype=torch.float64)


@pytest.mark.parametrize("batch_size", [1, 2])
@pytest.mark.parametrize("spec", [CacheSpec(5, 2.0, 0.3), CacheSpec(12, 0.7, 0.5), CacheSpec(1000, 1.5, 0.2)])
def test_vectorized_cache_equals_per_token_reference(
    model: LanguageModel, ids: torch.Tensor, spec: CacheSpec, batch_size: int
) -> None:
    # bptt 7: windows smaller and larger than a bptt window, and one longer than the stream
    result = cache_evaluate(model, ids, spec, batch_size, bptt=7, keep_token_nll=True)
    expected = reference_cache_nll(model, ids, spec, batch_size)
    torch.testing.assert_close(result.token_nll.double(), expected, rtol=1e-5, atol=1e-5)
    assert result.loss == pytest.approx(float(expected.mean()), rel=1e-6)
    assert result.tokens == expected.numel()


@pytest.mark.parametrize("batch_size", [1, 2, 3])
@pytest.mark.parametrize("bptt", [4, 9])
def test_lambda_zero_equals_plain_evaluation_exactly(
    model: LanguageModel, ids: torch.Tensor, batch_size: int, bptt: int
) -> None:
    plain = evaluate(model, ids, batch_size, bptt, keep_token_nll=True)
    result = cache_evaluate(model, ids, CacheSpec(6, 1.0, 0.0), batch_size, bptt, keep_token_nll=True)
    assert result.loss == plain.loss and result.tokens == plain.tokens
    assert torch.equal(result.token_nll, plain.token_nll)
    assert torch.equal(result.positions, plain.positions)
    assert result.plain.loss == plain.loss and torch.equal(result.plain.token_nll, plain.token_nll)


@pytest.mark.parametrize("lam", [0.0, 0.3])
@torch.no_grad()
def test_full_distribution_sums_to_one_and_matches_the_evaluation(
    model: LanguageModel, ids: torch.Tensor, lam: float
) -> None:
    spec = CacheSpec(6, 1.5, lam)
    even = ids[: ids.numel() - (ids.numel() - 1) % 2]  # an even number of targets: two streams of equal length
    data = torch.stack(streams_of(even, 2))
    x, y = data[:, :-1], data[:, 1:]
    out = model(x)
    log_p = cache_distribution(model.output.predict(out), out.output, y, 0, spec)
    assert log_p.shape == (2, y.size(1), V)
    torch.testing.assert_close(log_p.exp().sum(-1), torch.ones(2, y.size(1)), rtol=0, atol=1e-5)
    result = cache_evaluate(model, even, spec, 2, bptt=5, keep_token_nll=True)
    torch.testing.assert_close(
        -log_p.gather(2, y.unsqueeze(-1)).squeeze(-1).flatten(), result.token_nll, rtol=1e-5, atol=1e-5
    )


def test_evaluated_probabilities_of_every_next_word_sum_to_one(model: LanguageModel, ids: torch.Tensor) -> None:
    """The evaluation path itself: score each of the V possible words after a prefix."""
    prefix = ids[:30]
    for spec in (CacheSpec(8, 2.0, 0.3), CacheSpec(100, 0.5, 0.0)):
        total = 0.0
        for word in range(V):
            stream = torch.cat([prefix, torch.tensor([word])])
            total += math.exp(-float(cache_evaluate(model, stream, spec, 1, bptt=7, keep_token_nll=True).token_nll[-1]))
        assert total == pytest.approx(1.0, abs=1e-5)


def test_theta_zero_attends_uniformly_to_the_available_history(model: LanguageModel, ids: torch.Tensor) -> None:
    window = 4
    result = cache_evaluate(model, ids, CacheSpec(window, 0.0, 1.0), 1, bptt=6, keep_token_nll=True)
    plain = evaluate(model, ids, 1, 6, keep_token_nll=True)
    y = ids[1:].tolist()
    p = torch.exp(-result.token_nll.double())
    assert float(p[0]) == pytest.approx(math.exp(-float(plain.token_nll[0])), rel=1e-6), (
        "position 0 has no cache: the model alone"
    )
    for t in range(1, len(y)):
        seen = y[max(0, t - window) : t]
        assert float(p[t]) == pytest.approx(seen.count(y[t]) / len(seen), abs=1e-6)


def test_search_picks_the_setting_with_the_lowest_loss(model: LanguageModel, ids: torch.Tensor) -> None:
    grid = CacheGrid(windows=(3, 20), thetas=(0.0, 2.0), lams=(0.0, 0.2, 0.5))
    search = cache_search(model, ids, grid, batch_size=2, bptt=7)
    assert len(search.results) == len(grid) == 12
    losses = {}
    for row in search.results:
        spec = CacheSpec(row["window"], row["theta"], row["lambda"])
        losses[spec] = cache_evaluate(model, ids, spec, 2, bptt=7).loss
        assert row["loss"] == pytest.approx(losses[spec], rel=1e-6)
    assert search.best == min(losses, key=losses.get)
    assert search.loss == pytest.approx(min(losses.values()), rel=1e-6)
    assert search.model_loss == pytest.approx(evaluate(model, ids, 2, 7).loss, rel=1e-12)


def test_loss_delta_table_sums_to_the_total_loss_difference(
    model: LanguageModel, ids: torch.Tensor, vocab: Vocab, tmp_path: Path
) -> None:
    result = cache_evaluate(model, ids, CacheSpec(10, 2.0, 0.3), 2, bptt=7, keep_token_nll=True)
    rows = loss_deltas(result, result.plain, ids, vocab)
    assert sum(count for _, count, _ in rows) == result.tokens
    assert sum(delta for _, _, delta in rows) == pytest.approx(
        (result.loss - result.plain.loss) * result.tokens, rel=1e-9, abs=1e-9
    )
    assert [delta for _, _, delta in rows] == sorted(delta for _, _, delta in rows), "most helped (most negative) first"
    targets = ids[result.positions.flatten()]
    diff = (result.token_nll - result.plain.token_nll).flatten().double()
    for word, count, delta in rows:
        chosen = targets == vocab.stoi[word]
        assert count == int(chosen.sum()) and delta == pytest.approx(float(diff[chosen].sum()), abs=1e-9)
    path = tmp_path / "deltas.tsv"
    write_loss_deltas(path, result, result.plain, ids, vocab)
    with open(path, newline="", encoding="utf-8") as fh:
        table = list(csv.DictReader(fh, delimiter="\t"))
    assert [(r["word"], int(r["count"])) for r in table] == [(w, c) for w, c, _ in rows]
    assert sum(float(r["delta_loss"]) for r in table) == pytest.approx(sum(d for _, _, d in rows), abs=1e-4)


@pytest.mark.parametrize("cached", [False, True])
def test_word_probs_file_matches_the_per_token_nll(
    model: LanguageModel, ids: torch.Tensor, vocab: Vocab, tmp_path: Path, cached: bool
) -> None:
    if cached:
        result = cache_evaluate(model, ids, CacheSpec(10, 2.0, 0.3), 3, bptt=7, keep_token_nll=True)
    else:
        result = evaluate(model, ids, 3, 7, keep_token_nll=True)
    path = tmp_path / "probs.tsv"
    write_word_probs(path, result, ids, vocab)
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    assert list(rows[0]) == ["position", "line", "index", "word", "prob", "log_prob"]
    expected = list(range(1, ids.numel()))
    positions = [int(r["position"]) for r in rows]
    assert positions == expected
    assert [r["word"] for r in rows] == [vocab.itos[int(ids[p])] for p in positions]
    nll_at = dict(zip(result.positions.flatten().tolist(), result.token_nll.flatten().tolist()))
    for r in rows:
        assert float(r["log_prob"]) == pytest.approx(-nll_at[int(r["position"])], rel=1e-7, abs=1e-7)
        assert float(r["prob"]) == pytest.approx(math.exp(float(r["log_prob"])), rel=1e-7)
    assert sum(float(r["log_prob"]) for r in rows) == pytest.approx(-result.loss * result.tokens, rel=1e-6)
    assert not [p for p in tmp_path.iterdir() if p.name != "probs.tsv"], "no temporary file left"


def test_word_probs_rows_map_back_to_lines(model: LanguageModel, vocab: Vocab, tmp_path: Path) -> None:
    text = [["w1", "w2", "w3"], [], ["w2"], ["w3", "w1"]]
    stream = [w for line in text for w in [*line, EOS]]
    ids = torch.tensor(vocab.encode(stream))
    result = evaluate(model, ids, 2, 3, keep_token_nll=True)
    path = tmp_path / "probs.tsv"
    write_word_probs(path, result, ids, vocab, first_log_prob=-1.5)
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    assert [int(r["position"]) for r in rows] == list(range(len(stream))), "every token once, the first too"
    assert float(rows[0]["log_prob"]) == -1.5
    places = [(n, i) for n, line in enumerate(text, 1) for i in range(len(line) + 1)]
    assert [(int(r["line"]), int(r["index"])) for r in rows] == places
    assert [r["word"] for r in rows] == [text[n - 1][i] if i < len(text[n - 1]) else EOS for n, i in places]


def test_word_probs_needs_per_token_nll(model: LanguageModel, ids: torch.Tensor, vocab: Vocab, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="keep_token_nll"):
        write_word_probs(tmp_path / "p.tsv", evaluate(model, ids, 1, 7), ids, vocab)
    assert not list(tmp_path.iterdir())


def test_parse_cache_spec() -> None:
    assert parse_cache_spec("window=2000,theta=0.3,lambda=0.1") == CacheSpec(2000, 0.3, 0.1)
    assert parse_cache_spec(" lambda=0.5 , window=7,theta=0") == CacheSpec(7, 0.0, 0.5)
    assert parse_cache_spec("") == DEFAULT_SPEC == CacheSpec(2000, 1.0, 0.1)
    assert parse_cache_spec("window=300") == CacheSpec(300, DEFAULT_SPEC.theta, DEFAULT_SPEC.lam)
    assert parse_cache_spec("lambda=1,theta=0") == CacheSpec(2000, 0.0, 1.0)
    assert str(CacheSpec(3785, 0.662, 0.1279)) == "window=3785,theta=0.662,lambda=0.1279"


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("window=2000;theta=1", "window"),
        ("window", "malformed"),
        ("window=,theta=1", "malformed"),
        ("window=2000,,lambda=0.1", "malformed"),
        ("window=0", "window=0"),
        ("window=-5", "window=-5"),
        ("window=20.5", "window"),
        ("theta=-1", "theta=-1"),
        ("theta=nan", "theta"),
        ("theta=inf", "theta"),
        ("lambda=1.5", "lambda=1.5"),
        ("lambda=-0.1", "lambda"),
        ("lambda=abc", "lambda"),
        ("alpha=3", "unknown key 'alpha'"),
        ("window=10,window=20", "window twice"),
    ],
)
def test_parse_cache_spec_rejects(text: str, fragment: str) -> None:
    with pytest.raises(ReglmError, match="--cache") as info:
        parse_cache_spec(text)
    assert fragment in str(info.value)


def test_parse_cache_grid() -> None:
    grid = parse_cache_grid("window=500,2000;theta=0.1,0.3;lambda=0.05,0.1,0.05")
    assert grid == CacheGrid((500, 2000), (0.1, 0.3), (0.05, 0.1)) and len(grid) == 8
    assert parse_cache_grid("") == DEFAULT_GRID
    assert parse_cache_grid("theta=0.5") == CacheGrid(DEFAULT_GRID.windows, (0.5,), DEFAULT_GRID.lams)
    for text, fragment in (
        ("window=0,10", "window=0"),
        ("theta=1;theta=2", "twice"),
        ("lambda=2", "lambda=2"),
        ("beta=1", "unknown key"),
        ("window=10,", "window"),
    ):
        with pytest.raises(ReglmError, match="--cache-search") as info:
            parse_cache_grid(text)
        assert fragment in str(info.value)


def test_spec_checks_its_own_ranges() -> None:
    for bad in ((0, 1.0, 0.1), (10, -1.0, 0.1), (10, 1.0, 1.5), (10.0, 1.0, 0.1)):
        with pytest.raises(ReglmError):
            CacheSpec(*bad)
