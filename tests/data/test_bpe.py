"""BPE sub-word corpora (Baevski & Auli 2019, 4.4): units learnt on train.txt, word ends, word-level
perplexity, tokenizer.json in model directories, and the API on a BPE model."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer

import reglm
from reglm.config import ModelConfig, build_config
from reglm.data import BPEVocab, corpus_stats, load_directory, read_tokens, resolve
from reglm.data.bpe import SUFFIX, WHITESPACE, require_tokenizers
from reglm.data.corpus import encode_subword_file
from reglm.data.vocab import EOS, UNK, Vocab
from reglm.errors import ReglmError
from reglm.evaluate.perplexity import evaluate
from reglm.modeldir import load_model_dir, save_model_dir
from reglm.models import LanguageModel
from reglm.rundir import TOKENIZER_FILE, VOCAB_FILE

TRAIN = """the lower lowest newer newest low low widest wider <unk> the the
 a lowest newest widest  lower\tlow the <unk>

the newer wider newest the lowest
"""
VALID = "the lowest newish wider\nzebra <unk> low\n"
TEST = "low lower\n\nthe newest\n"
SIZE = 30
"""Small enough that most words are cut into several units (the alphabet alone is 19 units)."""


def write_corpus(root: Path, train: str = TRAIN, valid: str = VALID, test: str = TEST) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, text in (("train", train), ("valid", valid), ("test", test)):
        (root / f"{name}.txt").write_text(text, encoding="utf-8")
    return root


@pytest.fixture
def corpus_dir(tmp_path: Path) -> Path:
    return write_corpus(tmp_path / "tiny")


def test_word_corpora_are_unchanged(corpus_dir: Path) -> None:
    corpus = load_directory(corpus_dir)
    assert corpus.word_ends is None and corpus.tokenizer is None and corpus.split_word_ends("valid") is None
    assert type(corpus.vocab) is Vocab
    assert set(corpus_stats(corpus)) == {"name", "vocab_size", "has_unk", "tokens", "unk_rate"}


def test_units_are_frequency_ordered_and_specials_stay_whole(corpus_dir: Path) -> None:
    corpus = load_directory(corpus_dir, tokenizer="bpe", bpe_vocab_size=SIZE)
    vocab = corpus.vocab
    assert isinstance(vocab, BPEVocab) and corpus.tokenizer is vocab
    assert vocab.itos == sorted(vocab.itos, key=lambda u: (-vocab.counts[vocab.stoi[u]], u))
    assert torch.equal(torch.bincount(corpus.train, minlength=len(vocab)), torch.tensor(vocab.counts))
    assert vocab.units(UNK) == [UNK] and vocab.units(EOS) == [EOS]
    words = read_tokens(corpus_dir / "train.txt")
    assert vocab.counts[vocab.eos_id] == words.count(EOS) == 4  # one <eos> per line, blank lines included
    assert vocab.counts[vocab.unk_id] == words.count(UNK) == 2
    assert (
        vocab.units("the") == ["the" + SUFFIX] and len(vocab.units("lowest")) > 1
    )  # the most frequent word is one unit
    assert len(vocab) <= SIZE


def test_same_text_and_settings_give_the_same_units_and_ids(corpus_dir: Path) -> None:
    a = load_directory(corpus_dir, tokenizer="bpe", bpe_vocab_size=SIZE)
    b = load_directory(corpus_dir, tokenizer="bpe", bpe_vocab_size=SIZE)
    assert a.vocab == b.vocab and a.vocab.tokenizer_fingerprint() == b.vocab.tokenizer_fingerprint()
    for split in ("train", "valid", "test"):
        assert torch.equal(a.split(split), b.split(split)) and torch.equal(
            a.split_word_ends(split), b.split_word_ends(split)
        )
    # another process (the learner's hash maps are seeded per process) learns the same tokenizer
    code = (
        "import sys; from reglm.data import load_directory; "
        f"c = load_directory(sys.argv[1], tokenizer='bpe', bpe_vocab_size={SIZE}); "
        "print(c.vocab.tokenizer_fingerprint())"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(corpus_dir)], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == a.vocab.tokenizer_fingerprint()


def test_units_of_each_word_rejoin_to_the_word(corpus_dir: Path) -> None:
    corpus = load_directory(corpus_dir, tokenizer="bpe", bpe_vocab_size=SIZE)
    vocab = corpus.vocab
    words = read_tokens(corpus_dir / "train.txt")
    for word in set(words) - {EOS, UNK}:
        units = vocab.units(word)
        assert units[-1].endswith(SUFFIX) and not any(u.endswith(SUFFIX) for u in units[:-1])
        assert "".join(units).removesuffix(SUFFIX) == word
    assert vocab.join(corpus.train.tolist(), corpus.split_word_ends("train").tolist()) == words
    plain = [w for w in words if w != UNK]  # without word_ends a word ends at </w> or <eos>, and <unk> is ambiguous
    assert vocab.join([i for i in corpus.train.tolist() if i != vocab.unk_id]) == plain


def test_word_ends_count_the_words_of_the_word_rule(corpus_dir: Path) -> None:
    corpus = load_directory(corpus_dir, tokenizer="bpe", bpe_vocab_size=SIZE)
    vocab = corpus.vocab
    stats = corpus_stats(corpus)
    for split in ("train", "valid", "test"):
        ids, ends = corpus.split(split), corpus.split_word_ends(split)
        words = read_tokens(corpus_dir / f"{split}.txt")
        assert ids.shape == ends.shape and ends.dtype == torch.bool
        assert int(ends.sum()) == len(words) == stats["words"][split]
        assert stats["tokens"][split] == ids.numel() > len(words)
        assert bool(ends[ids == vocab.eos_id].all()) and int(ends[-1]) and int(ids[-1]) == vocab.eos_id
        assert (ids == vocab.eos_id).sum() == words.count(EOS)
    # valid: "newish" ends with a character never seen at a word end, "zebra" has unseen letters:
    # <unk> units, and the word ends stay exact
    valid_ids, valid_ends = encode_subword_file(corpus_dir / "valid.txt", vocab)
    assert torch.equal(valid_ids, corpus.valid) and torch.equal(valid_ends, corpus.split_word_ends("valid"))
    assert vocab.unk_id in vocab.word_units(["zebra"])[0]
    assert len(vocab.join(valid_ids.tolist(), valid_ends.tolist())) == len(read_tokens(corpus_dir / "valid.txt"))


def test_word_level_perplexity_is_summed_unit_nll_over_words(corpus_dir: Path) -> None:
    """Both sides from a tiny model: one direct forward pass over the whole stream (the unit
    log-probabilities) against evaluate() with word_ends, at several batch sizes."""
    corpus = load_directory(corpus_dir, tokenizer="bpe", bpe_vocab_size=SIZE)
    model = LanguageModel(ModelConfig.build(emb_size=8, hidden_size=8, num_layers=1), len(corpus.vocab)).eval()
    ids, ends = corpus.valid, corpus.split_word_ends("valid")
    with torch.no_grad():
        logp = model.output.log_probs(model(ids[:-1].unsqueeze(0)).output)[0]
    nll = -logp.gather(1, ids[1:].unsqueeze(1)).squeeze(1).double()
    words = int(ends[1:].sum())  # the first unit is not a target
    result = evaluate(model, ids, batch_size=1, bptt=4, word_ends=ends)
    assert result.tokens == ids.numel() - 1 and result.words == words < result.tokens
    assert result.ppl == pytest.approx(math.exp(float(nll.sum()) / words), rel=1e-5)
    assert result.ppl > math.exp(result.loss)  # fewer words than units
    for batch_size in (2, 3):  # streams start from a zero state: other NLLs, the same words
        result = evaluate(model, ids, batch_size=batch_size, bptt=4, word_ends=ends, keep_token_nll=True)
        assert result.words == words and torch.equal(result.positions, torch.arange(1, ids.numel()))
        assert result.ppl == pytest.approx(math.exp(float(result.token_nll.double().sum()) / words), rel=1e-5)
    # a hand-made case: units of probability 1/2 each, words of 1, 2 and 3 units
    nll_units = torch.full((6,), math.log(2.0), dtype=torch.float64)
    word_ends = torch.tensor([True, False, True, False, False, True])
    assert math.exp(float(nll_units.sum()) / int(word_ends.sum())) == pytest.approx(4.0)  # p(word) = 2^-2 on average


def test_tokenizer_json_round_trip_gives_the_same_units(corpus_dir: Path, tmp_path: Path) -> None:
    corpus = load_directory(corpus_dir, tokenizer="bpe", bpe_vocab_size=SIZE)
    vocab = corpus.vocab
    path = tmp_path / TOKENIZER_FILE
    vocab.save_tokenizer(path)
    plain = Tokenizer.from_file(str(path))  # what a user does
    assert plain.get_vocab() == vocab.stoi
    stream: list[int] = []
    for line in (corpus_dir / "valid.txt").read_text(encoding="utf-8").splitlines():
        stream += plain.encode(line).ids + [vocab.eos_id]
    assert stream == corpus.valid.tolist()
    assert plain.encode("a\x1clow").tokens == vocab.decode(
        vocab.encode_words(["a", "low"])[0]
    )  # str.split's whitespace
    vocab.save(tmp_path / VOCAB_FILE)
    loaded = BPEVocab.from_tokenizer_file(Vocab.load(tmp_path / VOCAB_FILE), path)
    assert loaded == vocab and loaded.tokenizer_fingerprint() == vocab.tokenizer_fingerprint()
    again = load_directory(corpus_dir, vocab=loaded)  # a fixed BPE vocabulary: nothing is learnt
    for split in ("train", "valid", "test"):
        assert torch.equal(again.split(split), corpus.split(split))
        assert torch.equal(again.split_word_ends(split), corpus.split_word_ends(split))
    assert tuple(c for c in range(0x110000) if chr(c).isspace()) == WHITESPACE


def test_a_tokenizer_that_does_not_match_the_vocabulary_is_refused(corpus_dir: Path, tmp_path: Path) -> None:
    vocab = load_directory(corpus_dir, tokenizer="bpe", bpe_vocab_size=SIZE).vocab
    other = load_directory(
        write_corpus(tmp_path / "other", "xy yx xyz zyx\n" * 3, "xy\n", "yx\n"), tokenizer="bpe", bpe_vocab_size=SIZE
    ).vocab
    other.save_tokenizer(tmp_path / "other.json")
    with pytest.raises(ReglmError, match="does not match the vocabulary"):
        BPEVocab.from_tokenizer_file(vocab, tmp_path / "other.json")
    # same units, other ids
    spec = json.loads(vocab.tokenizer_json())
    units = spec["model"]["vocab"]
    a, b = vocab.itos[0], vocab.itos[1]
    units[a], units[b] = units[b], units[a]
    for token in spec["added_tokens"]:
        token["id"] = units[token["content"]]
    (tmp_path / "swapped.json").write_text(json.dumps(spec), encoding="utf-8")
    with pytest.raises(ReglmError, match="2 with other ids"):
        BPEVocab.from_tokenizer_file(vocab, tmp_path / "swapped.json")
    (tmp_path / "bad.json").write_text("{}", encoding="utf-8")
    with pytest.raises(ReglmError, match="not a reglm BPE tokenizer"):
        BPEVocab.from_tokenizer_file(vocab, tmp_path / "bad.json")
    with pytest.raises(ReglmError, match="missing"):
        BPEVocab.from_tokenizer_file(vocab, tmp_path / "absent.json")


def _bpe_config(corpus_dir: Path):
    return build_config(
        None,
        [
            f"data.name={corpus_dir}",
            "data.tokenizer=bpe",
            f"data.bpe_vocab_size={SIZE}",
            "model.emb_size=8",
            "model.hidden_size=8",
            "model.num_layers=1",
        ],
    )


def test_model_directory_holds_the_tokenizer_and_refuses_a_mismatch(corpus_dir: Path, tmp_path: Path) -> None:
    config = _bpe_config(corpus_dir)
    corpus = resolve(config.data.name, tokenizer=config.data.tokenizer, bpe_vocab_size=config.data.bpe_vocab_size)
    model = LanguageModel(config.model, len(corpus.vocab), corpus.vocab)
    save_model_dir(tmp_path / "m", model, config, corpus.vocab)
    assert (tmp_path / "m" / TOKENIZER_FILE).is_file()
    loaded, loaded_config, vocab = load_model_dir(tmp_path / "m")
    assert isinstance(vocab, BPEVocab) and vocab == corpus.vocab and loaded_config.data.tokenizer == "bpe"
    assert vocab.encode_words(["the", "lowest"]) == corpus.vocab.encode_words(["the", "lowest"])
    # the same units and ids with other merges: another segmentation
    spec = json.loads((tmp_path / "m" / TOKENIZER_FILE).read_text(encoding="utf-8"))
    spec["model"]["merges"] = spec["model"]["merges"][:-1]
    (tmp_path / "m" / TOKENIZER_FILE).write_text(json.dumps(spec), encoding="utf-8")
    with pytest.raises(ReglmError, match="merges differ"):
        load_model_dir(tmp_path / "m")
    # a model directory whose tokenizer.json is another corpus's
    other = load_directory(
        write_corpus(tmp_path / "other", "xy yx xyz zyx\n" * 3, "xy\n", "yx\n"), tokenizer="bpe", bpe_vocab_size=SIZE
    ).vocab
    other.save_tokenizer(tmp_path / "m" / TOKENIZER_FILE)
    with pytest.raises(ReglmError, match="does not match the vocabulary"):
        load_model_dir(tmp_path / "m")
    (tmp_path / "m" / TOKENIZER_FILE).unlink()
    with pytest.raises(ReglmError, match="tokenizer.json is missing"):
        load_model_dir(tmp_path / "m")
    # a word model directory with a stray tokenizer.json
    word_config = build_config(
        None, [f"data.name={corpus_dir}", "model.emb_size=8", "model.hidden_size=8", "model.num_layers=1"]
    )
    words = load_directory(corpus_dir)
    save_model_dir(tmp_path / "w", LanguageModel(word_config.model, len(words.vocab)), word_config, words.vocab)
    assert not (tmp_path / "w" / TOKENIZER_FILE).exists()
    assert type(load_model_dir(tmp_path / "w")[2]) is Vocab
    corpus.vocab.save_tokenizer(tmp_path / "w" / TOKENIZER_FILE)
    with pytest.raises(ReglmError, match="stray"):
        load_model_dir(tmp_path / "w")


def test_api_on_a_bpe_model_is_word_level(corpus_dir: Path, tmp_path: Path) -> None:
    config = _bpe_config(corpus_dir)
    corpus = resolve(config.data.name, tokenizer="bpe", bpe_vocab_size=SIZE)
    torch.manual_seed(1)
    save_model_dir(tmp_path / "m", LanguageModel(config.model, len(corpus.vocab), corpus.vocab), config, corpus.vocab)
    lm = reglm.load(tmp_path / "m")
    assert lm.subword is not None
    text = (corpus_dir / "valid.txt").read_text(encoding="utf-8")
    ids, ends = lm.text_to_units(text)
    assert ids == corpus.valid.tolist() and ends == corpus.split_word_ends("valid").tolist()
    assert lm.text_to_ids(text) == ids
    stream = torch.tensor([corpus.vocab.eos_id, *ids])
    with torch.no_grad():
        logp = lm.model.output.log_probs(lm.model(stream[:-1].unsqueeze(0)).output)[0]
    unit_logp = logp.gather(1, stream[1:].unsqueeze(1)).squeeze(1).double()
    n_words = len(read_tokens(corpus_dir / "valid.txt"))
    assert sum(ends) == n_words
    assert lm.perplexity(text) == pytest.approx(math.exp(-float(unit_logp.sum()) / n_words), rel=1e-5)
    assert lm.perplexity(text) > math.exp(-float(unit_logp.mean()))
    first = text.splitlines()[0]
    n_units = len(lm.tokens_to_ids(first.split())) + 1
    assert lm.score(first) == pytest.approx(float(unit_logp[:n_units].sum()), abs=1e-4)
    prompt = corpus.vocab.units("the") + corpus.vocab.units("lowest")
    sampled = lm.generate(3, prompt="the lowest")
    assert sampled[: len(prompt)] == prompt and len(sampled) == len(prompt) + 3


def test_options_and_a_missing_library(corpus_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert build_config(None, ["data.name=ptb", "data.tokenizer=bpe"]).data.bpe_vocab_size == 32000
    with pytest.raises(ReglmError, match="data.tokenizer"):
        build_config(None, ["data.tokenizer=sentencepiece"])
    with pytest.raises(ReglmError, match="data.bpe_vocab_size"):
        build_config(None, ["data.name=ptb", "data.tokenizer=bpe", "data.bpe_vocab_size=3"])
    with pytest.raises(ReglmError, match="bpe_vocab_size"):
        build_config(None, ["data.name=ptb", "data.tokenizer=bpe", "data.max_vocab=100"])
    with pytest.raises(ReglmError, match="synthetic"):
        build_config(None, ["data.tokenizer=bpe"])
    with pytest.raises(ReglmError, match="synthetic"):
        resolve("synthetic", tokenizer="bpe")
    with pytest.raises(ReglmError, match="min_freq"):
        load_directory(corpus_dir, tokenizer="bpe", min_freq=2)
    with pytest.raises(ReglmError, match="unknown tokenizer"):
        load_directory(corpus_dir, tokenizer="chars")
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    with pytest.raises(ReglmError, match=r'pip install "reglm\[bpe\]"'):
        require_tokenizers()
    with pytest.raises(ReglmError, match=r'pip install "reglm\[bpe\]"'):
        load_directory(corpus_dir, tokenizer="bpe")
    assert load_directory(corpus_dir).word_ends is None  # word corpora need no tokenizers


def test_train_counts_words_not_lines() -> None:
    """Learning from word counts: the same counts, however they were read, give the same units."""
    counts = Counter("low low low lower lowest newer newest newest wide widest <unk> <eos> <eos>".split())
    a = BPEVocab.train(counts, SIZE)
    b = BPEVocab.train(dict(reversed(list(counts.items()))), SIZE)
    assert a == b and a.tokenizer_fingerprint() == b.tokenizer_fingerprint()
    assert a.counts[a.eos_id] == 2 and a.counts[a.unk_id] == 1
