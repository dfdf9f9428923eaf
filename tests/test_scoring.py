"""Sentence scoring: ``lm.score_batch``/``full_scores``/``next_words`` and ``reglm score``, against
each sentence scored alone by one direct forward pass; sampling cut-offs against brute force."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from reglm.api import TrainedModel, truncated
from reglm.cli import main
from reglm.config import build_config
from reglm.data.sentence_plan import SentencePlan
from reglm.data.vocab import EOS, UNK, Vocab
from reglm.errors import ReglmError
from reglm.evaluate.sentences import sentence_log_probs
from reglm.modeldir import save_model_dir
from reglm.models import LanguageModel

V = 60
WORDS = [f"w{i}" for i in range(1, V - 1)]
FAMILIES = {
    "awd-lstm": ("tiny", []),
    "vd-lstm-untied": ("tiny", ["model.encoder=vd-lstm", "model.output.tie_weights=false"]),
    "mos": ("mos-tiny", []),
    "transformer-adaptive": ("transformer-tiny", ["model.input.cutoffs=20,40", "model.output.cutoffs=20,40"]),
}
SENTENCES = ["w1 w2 w3", "", "w7", "w4 w4 w9 w12 w30 w2 w2 w5", "w3 w1", "w10 w11 w12 w13 w14 w15 w16 w17 w18 w19 w20"]


def _vocab() -> Vocab:
    return Vocab([EOS, UNK, *WORDS], [V - i for i in range(V)])


def _model(family: str) -> TrainedModel:
    preset, overrides = FAMILIES[family]
    torch.manual_seed(1)
    model = LanguageModel(build_config(preset, overrides).model, V)
    return TrainedModel(model, _vocab(), torch.device("cpu"))


def _alone(lm: TrainedModel, sentence: str) -> torch.Tensor:
    """The reference: one sentence, one forward pass over <eos> and its words, batch of one."""
    ids = [lm.vocab.eos_id, *(lm.vocab.stoi.get(w, lm.vocab.unk_id) for w in sentence.split()), lm.vocab.eos_id]
    with torch.no_grad():
        out = lm.model(torch.tensor([ids[:-1]]), lm.model.init_state(1))
        return -lm.model.output.nll(out, torch.tensor([ids[1:]]))[0].double()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_batched_scores_equal_each_sentence_scored_alone(family: str) -> None:
    lm = _model(family)
    expected = [float(_alone(lm, s).sum()) for s in SENTENCES]
    assert lm.score_batch(SENTENCES) == pytest.approx(expected, abs=1e-5)
    assert [lm.score(s) for s in SENTENCES] == pytest.approx(expected, abs=1e-5)
    words = lm.full_scores(SENTENCES[3])
    assert [w.word for w in words] == SENTENCES[3].split() + [EOS]
    assert [w.log_prob for w in words] == pytest.approx(_alone(lm, SENTENCES[3]).tolist(), abs=1e-6)


def test_batch_size_and_order_change_nothing() -> None:
    lm = _model("awd-lstm")
    sentences = [[lm.vocab.stoi[w] for w in s.split()] + [lm.vocab.eos_id] for s in SENTENCES]
    one = sentence_log_probs(lm.model, sentences, lm.vocab.eos_id, batch_tokens=1)
    many = sentence_log_probs(lm.model, sentences, lm.vocab.eos_id, batch_tokens=1000)
    for a, b in zip(one, many):
        assert torch.allclose(a, b, atol=1e-6)
    plan = SentencePlan.of_sentences([[7] * 3, [7] * 5, [7], [7] * 5], 0, 10)
    assert [plan.group(k).tolist() for k in range(plan.batches)] == [[1, 3], [0, 2]], "longest first, 10 positions"


def test_the_sentence_plan_reads_each_given_sentence_after_the_context_in_the_order_given() -> None:
    """Scoring's batches are the window planner's: every id of every sentence a target once, its
    input the id before it (the context before the first), a sentence holding the context id
    (an ``<eos>`` written in a line) still one sentence."""
    sentences = [[5, 6], [4, 0, 3, 9, 8], [2], [7, 7, 7]]
    plan = SentencePlan.of_sentences(sentences, 0, 6)
    seen = []
    for window in plan.windows():
        assert window.inputs.numel() <= 6 or window.inputs.size(0) == 1
        for row in range(window.inputs.size(0)):
            scored = window.scored[row]
            targets, inputs = window.targets[row][scored].tolist(), window.inputs[row][scored].tolist()
            assert targets in sentences and inputs == [0, *targets[:-1]]
            seen.append(window.positions[row][scored])
    assert torch.equal(torch.sort(torch.cat(seen)).values, torch.tensor([1, 2, 4, 5, 6, 7, 8, 10, 12, 13, 14]))


def test_log10_oov_and_no_eos() -> None:
    lm = _model("awd-lstm")
    ln = lm.score("w1 zebra w2")
    assert lm.score("w1 zebra w2", base=10) == pytest.approx(ln / math.log(10), rel=1e-12)
    raw = lm.score("w1 zebra w2", oov_penalty=None)
    assert raw == pytest.approx(lm.score(f"w1 {UNK} w2"), abs=1e-9), "an OOV word is scored as <unk>"
    words = lm.full_scores("w1 zebra w2 quagga")
    assert [w.oov for w in words] == [False, True, False, True, False]
    without = lm.full_scores("w1 zebra w2", eos=False)
    assert [w.word for w in without] == ["w1", "zebra", "w2"]
    assert sum(w.log_prob for w in without) == pytest.approx(ln - lm.full_scores("w1 zebra w2")[-1].log_prob, abs=1e-9)
    assert lm.score("") == pytest.approx(float(_alone(lm, "").sum()), abs=1e-6), "an empty line scores <eos> alone"
    assert lm.score("", eos=False) == 0.0


def test_carry_reads_the_lines_as_one_text() -> None:
    lm = _model("awd-lstm")
    stream = [i for s in SENTENCES for i in [*(lm.vocab.stoi[w] for w in s.split()), lm.vocab.eos_id]]
    expected = lm.target_log_probs(stream)
    carried = [w.log_prob for words in lm.full_scores_batch(SENTENCES, carry=True) for w in words]
    assert carried == pytest.approx(expected.tolist(), abs=1e-6)
    assert lm.score_batch(SENTENCES, carry=True) != pytest.approx(lm.score_batch(SENTENCES), abs=1e-3), (
        "the context matters"
    )


def test_sub_word_model_scores_words_as_products_of_their_units() -> None:
    from reglm.data.bpe import BPEVocab

    bpe = BPEVocab.train({"lower": 5, "lowest": 3, "newer": 4, "wider": 2}, 18)
    torch.manual_seed(2)
    lm = TrainedModel(LanguageModel(build_config("tiny").model, len(bpe)), bpe, torch.device("cpu"))
    ids, ends = bpe.encode_words(["lowest", "newer", EOS])
    assert len(ids) > 3, "some word has several units"
    with torch.no_grad():
        out = lm.model(torch.tensor([[bpe.eos_id, *ids[:-1]]]), lm.model.init_state(1))
        units = -lm.model.output.nll(out, torch.tensor([ids]))[0].double()
    words = lm.full_scores("lowest newer")
    assert [w.word for w in words] == ["lowest", "newer", EOS]
    cut = [i + 1 for i, end in enumerate(ends) if end]
    expected = [float(units[a:b].sum()) for a, b in zip([0, *cut[:-1]], cut)]
    assert [w.log_prob for w in words] == pytest.approx(expected, abs=1e-6)
    assert lm.score_batch(["lowest newer", "wider"])[0] == pytest.approx(sum(expected), abs=1e-6)


def test_next_words_are_the_top_k_of_the_next_word_distribution() -> None:
    lm = _model("awd-lstm")
    ids = torch.tensor([[lm.vocab.eos_id, lm.vocab.stoi["w3"], lm.vocab.stoi["w5"]]])
    with torch.no_grad():
        log_p = lm.model.log_probs(ids, lm.model.init_state(1))[0][0, -1].double()
    log_p[lm.vocab.unk_id] = -math.inf
    values, order = torch.topk(log_p, 5)
    got = lm.next_words("w3 w5", 5, base=10)
    assert [w for w, _ in got] == [lm.vocab.itos[i] for i in order.tolist()]
    assert [p for _, p in got] == pytest.approx((values / math.log(10)).tolist(), rel=1e-9)
    assert UNK not in [w for w, _ in lm.next_words("w3", V)]


def test_api_input_errors() -> None:
    lm = _model("awd-lstm")
    with pytest.raises(ReglmError, match="score_batch"):
        lm.score(["w1", "w2"])  # type: ignore[arg-type]
    with pytest.raises(ReglmError, match="list of sentences"):
        lm.score_batch("w1 w2")
    with pytest.raises(ReglmError, match="list of sentences"):
        lm.score_batch(["w1", 3])  # type: ignore[list-item]
    with pytest.raises(ReglmError, match="log base"):
        lm.score("w1", base=2)
    with pytest.raises(ReglmError, match="not in the model's vocabulary"):
        lm.next_words("w1 zebra")
    with pytest.raises(ReglmError, match="positive integer"):
        lm.next_words("w1", 0)
    with pytest.raises(ReglmError, match="top-p"):
        lm.generate(3, top_p=1.5)


def test_top_k_and_top_p_keep_what_brute_force_keeps() -> None:
    probs = torch.tensor([0.05, 0.4, 0.1, 0.25, 0.2], dtype=torch.float64)
    assert torch.nonzero(truncated(probs, 2, None)).flatten().tolist() == [1, 3]
    # nucleus 0.6: 0.4 + 0.25 reaches it; nucleus 0.66: needs 0.2 too
    assert torch.nonzero(truncated(probs, None, 0.6)).flatten().tolist() == [1, 3]
    assert torch.nonzero(truncated(probs, None, 0.66)).flatten().tolist() == [1, 3, 4]
    assert torch.nonzero(truncated(probs, 3, 0.9)).flatten().tolist() == [1, 3, 4]
    assert torch.nonzero(truncated(probs, None, 1e-9)).flatten().tolist() == [1], "the most likely word always stays"
    assert torch.equal(truncated(probs, None, None), probs)
    lm = _model("awd-lstm")
    assert lm.generate(30, seed=3, top_k=1) == lm.generate(30, seed=4, top_k=1), "top-1 is greedy: no seed changes it"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    lm = _model("awd-lstm")
    directory = tmp_path_factory.mktemp("score") / "model"
    save_model_dir(directory, lm.model, build_config("tiny"), lm.vocab)
    return directory


def _cli(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_score_command_matches_the_api_and_echoes_nbest_ids(
    capsys: pytest.CaptureFixture, model_dir: Path, tmp_path: Path
) -> None:
    from reglm.api import load

    lm = load(model_dir)
    nbest = tmp_path / "nbest.txt"
    nbest.write_text(
        "".join(f"utt1-{i}\t{s}\n" for i, s in enumerate(SENTENCES)) + "utt2-0\tw1 zebra\n", encoding="utf-8"
    )
    code, out, err = _cli(capsys, "score", str(model_dir), str(nbest), "--base", "10")
    assert code == 0 and "sentences/s" in err and "tokens/s" in err
    lines = out.splitlines()
    assert lines[0].split("\t") == ["id", "log10_prob", "tokens", "oov", "ppl"]
    rows = [dict(zip(lines[0].split("\t"), line.split("\t"))) for line in lines[1:]]
    assert [r["id"] for r in rows] == [f"utt1-{i}" for i in range(len(SENTENCES))] + ["utt2-0"]
    expected = lm.score_batch([*SENTENCES, "w1 zebra"], base=10)
    assert [float(r["log10_prob"]) for r in rows] == pytest.approx(expected, abs=1e-6)
    assert [int(r["tokens"]) for r in rows] == [len(s.split()) + 1 for s in SENTENCES] + [3]
    assert [int(r["oov"]) for r in rows] == [0] * len(SENTENCES) + [1]
    assert float(rows[0]["ppl"]) == pytest.approx(10 ** (-expected[0] / 4), rel=1e-6)

    plain = tmp_path / "plain.txt"
    plain.write_text("\n".join(SENTENCES[:3]) + "\n", encoding="utf-8")
    out_file = tmp_path / "words.jsonl"
    code, _, _ = _cli(
        capsys, "score", str(model_dir), str(plain), "--words", "--format", "jsonl", "--no-eos", "--out", str(out_file)
    )
    records = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert code == 0 and [(r["id"], r["position"], r["word"]) for r in records] == [
        ("1", 0, "w1"),
        ("1", 1, "w2"),
        ("1", 2, "w3"),
        ("3", 0, "w7"),
    ]
    assert [r["ln_prob"] for r in records] == pytest.approx(
        [w.log_prob for s in SENTENCES[:3] for w in lm.full_scores(s, eos=False)], abs=1e-6
    )


def test_score_command_bad_input(capsys: pytest.CaptureFixture, model_dir: Path, tmp_path: Path) -> None:
    latin = tmp_path / "latin1.txt"
    latin.write_bytes(b"w1 w2\nw3 caf\xe9\n")
    code, _, err = _cli(capsys, "score", str(model_dir), str(latin))
    assert code == 2 and "line 2 is not UTF-8" in err and "Traceback" not in err
    mixed = tmp_path / "mixed.txt"
    mixed.write_text("a\tw1\nw2 w3\n", encoding="utf-8")
    code, _, err = _cli(capsys, "score", str(model_dir), str(mixed))
    assert code == 2 and "line 2 has no tab" in err
    code, _, err = _cli(capsys, "score", str(model_dir), str(tmp_path / "missing.txt"))
    assert code == 2 and "does not exist" in err
    code, _, err = _cli(capsys, "score", str(tmp_path), str(mixed))
    assert code == 2 and "reglm: error:" in err


@pytest.mark.parametrize("family", ["awd-lstm", "vd-lstm-untied"])
def test_streamed_tokens_on_the_short_call_kernel_equal_one_long_pass(family: str) -> None:
    """Generation and ``next_words`` read one token (or a short prefix) per call, which runs on the
    step-by-step cell (reglm.encoders.fused_lstm.lstm_kernel); one long pass runs on oneDNN. Both
    give the same log-probabilities to float32 rounding."""
    lm = _model(family)
    tokens = lm.generate(30, seed=3)
    ids = [lm.vocab.stoi[t] for t in tokens]
    whole = lm.target_log_probs(ids)
    state, streamed = lm.model.init_state(1), []
    with torch.no_grad():
        previous = lm.vocab.eos_id
        for i in ids:
            out = lm.model(torch.tensor([[previous]]), state)
            streamed.append(float(lm.model.output.predict(out)[0, -1, i]))
            state, previous = out.state, i
    assert streamed == pytest.approx(whole.tolist(), abs=1e-5)
    prefix = " ".join(tokens[:5]).replace(EOS, UNK)
    best = lm.next_words(prefix, k=3)
    encoded = [lm.vocab.stoi[t] for t in prefix.split()]
    with torch.no_grad():
        full = lm.model.log_probs(torch.tensor([[lm.vocab.eos_id, *encoded] + [0] * 40]))[0][0, len(encoded)]
    full[lm.vocab.unk_id] = -math.inf
    assert [v for _, v in best] == pytest.approx(torch.topk(full, 3).values.tolist(), abs=1e-5)
