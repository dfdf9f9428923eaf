"""Loss binned by word frequency (Baevski & Auli 2019, Figures 2 and 3) against a slow reference."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from reglm.analysis.frequency import BIN_LABELS, frequency_bin, loss_by_frequency
from reglm.cli import main
from reglm.config import build_config
from reglm.train.run import train


def _decade(count: int) -> int:
    return min(len(BIN_LABELS) - 1, 0 if count < 10 else len(str(count)) - 1)


def test_decades_are_the_papers_bins() -> None:
    counts = torch.tensor([0, 1, 9, 10, 99, 100, 999, 1000, 99_999, 100_000, 999_999, 1_000_000, 50_000_000])
    assert (
        frequency_bin(counts).tolist() == [_decade(int(c)) for c in counts] == [0, 0, 0, 1, 1, 2, 2, 3, 4, 5, 5, 6, 6]
    )


def _slow(nll: list[float], scored: list[bool], keys: list[int], counts: list[int], ends: list[bool]) -> dict:
    """Word by word: a word's loss is the sum over its units, kept only when all are scored."""
    words, start = [], 0
    for i, end in enumerate(ends):
        if end:
            words.append((start, i))
            start = i + 1
    own: dict[int, list[float]] = {}
    previous: dict[int, list[float]] = {}
    for w, (first, last) in enumerate(words):
        if not all(scored[first : last + 1]):
            continue
        loss = sum(nll[first : last + 1])
        own.setdefault(_decade(counts[keys[last]]), []).append(loss)
        if first > 0:
            previous.setdefault(_decade(counts[keys[first - 1]]), []).append(loss)

    def means(groups: dict[int, list[float]]) -> list[float | None]:
        return [sum(groups[b]) / len(groups[b]) if b in groups else None for b in range(len(BIN_LABELS))]

    return {"own": means(own), "previous": means(previous), "words": sum(len(v) for v in own.values())}


@pytest.mark.parametrize("subword", [False, True])
def test_binned_loss_equals_a_word_by_word_reference(subword: bool) -> None:
    gen = torch.Generator().manual_seed(3)
    n, n_keys = 400, 30
    counts = (10 ** (torch.rand(n_keys, generator=gen) * 7)).long()
    ends = torch.rand(n, generator=gen) < (0.6 if subword else 2.0)
    ends[-1] = True
    word_of = torch.cat([torch.zeros(1, dtype=torch.long), ends.long().cumsum(0)[:-1]])
    word_key = torch.randint(0, n_keys, (int(ends.sum()),), generator=gen)
    keys = word_key[word_of]
    positions = torch.arange(1, n)
    nll = torch.rand(n - 1, generator=gen, dtype=torch.float64) * 8
    got = loss_by_frequency(nll, positions, keys, counts, ends if subword else None)
    full = [math.nan] + nll.tolist()
    want = _slow(
        full, [False] + [True] * (n - 1), keys.tolist(), counts.tolist(), ends.tolist() if subword else [True] * n
    )
    assert got["words"] == want["words"]
    for got_means, want_means in (
        (got["by_frequency"]["mean_loss"], want["own"]),
        (got["by_previous_frequency"]["mean_loss"], want["previous"]),
    ):
        assert [m is None for m in got_means] == [m is None for m in want_means]
        assert [m for m in got_means if m is not None] == pytest.approx(
            [m for m in want_means if m is not None], rel=1e-12
        )
    assert sum(got["by_frequency"]["targets"]) == got["words"]


def test_analyze_by_frequency_writes_the_figure_and_data_for_several_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    runs = []
    for name, preset in (("lstm", "tiny"), ("transformer", "transformer-tiny")):
        run = tmp_path / name
        train(
            build_config(
                preset, ["train.epochs=1", "train.finetune=false"] if preset == "tiny" else ["train.epochs=1"]
            ),
            run,
            progress=False,
        )
        runs.append(str(run))
    out = tmp_path / "figures"
    assert main(["analyze", *runs, "--by-frequency", "--split", "valid", "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    data = json.loads((out / "loss-by-frequency.json").read_text())
    assert [r["label"] for r in data["runs"]] == ["lstm", "transformer"]
    for record in data["runs"]:
        assert record["by_frequency"]["bins"] == list(BIN_LABELS)
        assert sum(record["by_frequency"]["targets"]) == record["words"]
        kept = [(m, k) for m, k in zip(record["by_frequency"]["mean_loss"], record["by_frequency"]["targets"]) if k]
        assert math.exp(sum(m * k for m, k in kept) / record["words"]) == pytest.approx(record["ppl"], rel=1e-6)
    assert (out / "loss-by-frequency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for analysis in ([], ["--subspace"]):  # an adaptive input and softmax have no single (V, E) matrix
        assert main(["analyze", runs[1], *analysis, "--out", str(tmp_path / "other")]) == 2
        assert "(V, E)" in capsys.readouterr().err
