"""Out-of-vocabulary words in scoring: the vocabulary's record of the words mapped to <unk>, the
three ``oov_penalty`` settings on a hand example, and n-best rescoring with a model trained with
<unk>, where a hypothesis with a made-up word must never win; the TSV outputs read back by csv."""

from __future__ import annotations

import csv
import io
import json
import math
import random
from collections import Counter
from pathlib import Path

import pytest
import torch

from reglm.api import TrainedModel, load
from reglm.cli import main
from reglm.config import build_config
from reglm.data.vocab import EOS, UNK, Vocab
from reglm.errors import ReglmError
from reglm.evaluate.words import oov_offset
from reglm.models import LanguageModel
from reglm.train.run import train

NOUNS = ["cat", "dog", "bird", "fish", "man"]
VERBS = ["sees", "likes", "finds", "feeds"]
ADJECTIVES = ["big", "small", "red", '"']


def _sentence(rng: random.Random) -> list[str]:
    return ["the", rng.choice(ADJECTIVES), rng.choice(NOUNS), rng.choice(VERBS), "the", rng.choice(NOUNS)]


def _corpus(directory: Path) -> Path:
    """A tiny grammar; every training sentence also holds one word seen once (``min_freq=2`` maps
    them to <unk>, which becomes one of the most frequent tokens, as on PTB)."""
    rng = random.Random(0)
    directory.mkdir()
    for split, count in (("train", 400), ("valid", 40), ("test", 40)):
        lines = []
        for i in range(count):
            words = _sentence(rng)
            if split == "train":
                words.insert(rng.randrange(len(words) + 1), f"rare{i}")
            lines.append(" ".join(words))
        (directory / f"{split}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return directory


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("oov")
    data = _corpus(root / "data")
    overrides = [f"data.name={data}", "data.min_freq=2", "train.epochs=4", "train.finetune=false"]
    run = root / "run"
    train(build_config("tiny", overrides), run, progress=False)
    return run


def test_vocabulary_records_the_words_mapped_to_unk(tmp_path: Path) -> None:
    counter = Counter({"a": 5, "b": 3, "c": 1, "d": 1, "e": 2, EOS: 4, UNK: 2})
    vocab = Vocab.build(counter, min_freq=2)
    dropped = [w for w, n in counter.items() if n < 2 and w not in (EOS, UNK)]
    assert (vocab.unk_types, vocab.unk_tokens) == (len(dropped), sum(counter[w] for w in dropped)) == (2, 2)
    assert vocab.counts[vocab.unk_id] == 4, "<unk> counts its own occurrences and the dropped words'"
    assert vocab.unknown_types() == 2 + 2, "each <unk> already in the text counts as a type of its own"
    capped = Vocab.build(counter, max_vocab=4)
    assert capped.unk_types == len(counter) - 2 - 2 and capped.unk_tokens == 2 + 1 + 1 + 3 - 3
    path = tmp_path / "vocab.txt"
    vocab.save(path)
    assert f"{UNK}\t4\t2\t2\n" in path.read_text(encoding="utf-8")
    back = Vocab.load(path)
    assert back == vocab and (back.unk_types, back.unk_tokens) == (2, 2)
    old = tmp_path / "old.txt"
    old.write_text("".join(f"{t}\t{c}\n" for t, c in zip(vocab.itos, vocab.counts)), encoding="utf-8")
    legacy = Vocab.load(old)
    assert legacy == vocab and (legacy.unk_types, legacy.unk_tokens) == (0, 0), "old runs still resume and evaluate"
    assert legacy.unknown_types() == 4, "an old file: every <unk> token of the training text counts as a type"
    path.write_text(path.read_text(encoding="utf-8").replace(f"{UNK}\t4\t2\t2", f"{UNK}\t4\t9\t9"), encoding="utf-8")
    with pytest.raises(ReglmError, match="exceed"):
        Vocab.load(path)


def test_the_three_settings_on_a_hand_example() -> None:
    words = [EOS, UNK, "a", "b"]
    vocab = Vocab(words, [10, 7, 5, 3], unk_types=3, unk_tokens=5)
    assert vocab.unknown_types() == 3 + 7 - 5
    torch.manual_seed(0)
    lm = TrainedModel(LanguageModel(build_config("tiny").model, len(words)), vocab, torch.device("cpu"))
    with torch.no_grad():
        out = lm.model(torch.tensor([[vocab.eos_id, vocab.stoi["a"]]]), lm.model.init_state(1))
        log_p = lm.model.output.predict(out)[0].double()
    raw = float(log_p[1, vocab.unk_id])
    by_setting = {setting: lm.full_scores("a zzz", oov_penalty=setting)[1] for setting in ("share", None, "none", 2.5)}
    assert all(w.word == "zzz" and w.oov for w in by_setting.values())
    assert by_setting["share"].log_prob == pytest.approx(raw - math.log(5), abs=1e-6)
    assert by_setting[None].log_prob == by_setting["none"].log_prob == pytest.approx(raw, abs=1e-6)
    assert by_setting[2.5].log_prob == pytest.approx(raw - 2.5, abs=1e-6)
    log10 = lm.full_scores("a zzz", base=10, oov_penalty=2.5)[1].log_prob
    assert log10 == pytest.approx(raw / math.log(10) - 2.5, abs=1e-6)
    known = lm.full_scores("a b")[1].log_prob
    assert known == pytest.approx(float(log_p[1, vocab.stoi["b"]]), abs=1e-6), "known words are untouched"
    assert lm.score("a zzz b", oov_penalty=None) - lm.score("a zzz b") == pytest.approx(math.log(5), abs=1e-6)
    for bad in (-1.0, "loud", math.inf):
        with pytest.raises(ReglmError, match="oov penalty"):
            oov_offset(vocab, bad)


def test_a_made_up_word_never_wins_a_rescoring(
    trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lm = load(trained)
    assert lm.vocab.unk_types > 300, "min_freq=2 mapped the words seen once to <unk>"
    rng = random.Random(1)
    hypotheses = [" ".join(_sentence(rng)) for _ in range(8)]
    nbest = tmp_path / "nbest.txt"
    lines = []
    for n, hypothesis in enumerate(hypotheses):
        words = hypothesis.split()
        words[2 + n % 3] = "xyzzyplugh"
        lines += [f"u{n}\t{hypothesis}", f"u{n}\t{' '.join(words)}"]
    nbest.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert main(["score", str(trained), str(nbest), "--format", "jsonl"]) == 0
    out, err = capsys.readouterr()
    rows = [json.loads(line) for line in out.splitlines()]
    assert "--oov-penalty share" in err and all(row["oov_penalty"] == "share" for row in rows)
    for correct, nonsense in zip(rows[::2], rows[1::2]):
        assert correct["id"] == nonsense["id"] and nonsense["oov"] == 1
        assert correct["ln_prob"] > nonsense["ln_prob"], f"{correct['id']}: the made-up word outranks the correct one"
    raw = lm.score_batch([line.split("\t")[1] for line in lines], oov_penalty=None)
    shared = [row["ln_prob"] for row in rows[1::2]]
    expected = [math.log(lm.vocab.unknown_types())] * 8
    assert [r - s for r, s in zip(raw[1::2], shared)] == pytest.approx(expected, abs=1e-4)


def _read_tsv(text: str) -> list[list[str]]:
    return list(csv.reader(io.StringIO(text), delimiter="\t"))


def test_tsv_outputs_read_back_exactly(trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    words_file = tmp_path / "words.tsv"
    sentence = 'the " cat sees null the "quoted" n/a'
    (tmp_path / "in.txt").write_text(sentence + "\n", encoding="utf-8")
    assert main(["score", str(trained), str(tmp_path / "in.txt"), "--words", "--out", str(words_file)]) == 0
    rows = _read_tsv(words_file.read_text(encoding="utf-8"))
    assert rows[0] == ["id", "position", "word", "ln_prob", "oov"]
    assert [row[2] for row in rows[1:]] == [*sentence.split(), EOS]
    probs = tmp_path / "probs.tsv"
    assert main(["eval", str(trained), "--split", "test", "--word-probs", str(probs)]) == 0
    capsys.readouterr()
    rows = _read_tsv(probs.read_text(encoding="utf-8"))
    text = (trained.parent / "data" / "test.txt").read_text(encoding="utf-8")
    tokens = [w for line in text.splitlines() for w in [*line.split(), EOS]]
    assert [row[3] for row in rows[1:]] == tokens and '"' in tokens
    pandas = pytest.importorskip("pandas")
    frame = pandas.read_csv(probs, sep="\t", keep_default_na=False)
    assert frame["word"].tolist() == tokens
