"""The adaptive softmax (Grave et al. 2017) with Baevski & Auli's tail dropout and tying (Table 7)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from reglm.config import build_config
from reglm.data.vocab import Vocab
from reglm.encoders.base import EncoderOutput
from reglm.errors import ReglmError
from reglm.modeldir import load_model_dir, save_model_dir
from reglm.models import LanguageModel
from reglm.outputs import OUTPUTS
from reglm.outputs.adaptive_softmax import AdaptiveSoftmax
from reglm.outputs.adversarial import AdvSoft

V, D, CUTOFFS, K = 60, 16, (10, 30), 2.0


def wrap(h: torch.Tensor) -> EncoderOutput:
    return EncoderOutput(h, h, [h], None)


def layer(**kwargs) -> AdaptiveSoftmax:
    return AdaptiveSoftmax(D, V, CUTOFFS, K, **kwargs)


def targets_in_every_band(shape: tuple[int, int]) -> torch.Tensor:
    y = torch.randint(0, V, shape)
    y.view(-1)[:6] = torch.tensor([0, 9, 10, 29, 30, 59])
    return y


def torch_reference(out: AdaptiveSoftmax) -> torch.nn.AdaptiveLogSoftmaxWithLoss:
    ref = torch.nn.AdaptiveLogSoftmaxWithLoss(D, V, list(CUTOFFS), div_value=K, head_bias=False)
    with torch.no_grad():
        ref.head.weight.copy_(torch.cat([out.head_weight, out.cluster_weight]))
        for j, tail in enumerate(ref.tail):
            tail[0].weight.copy_(out.tail_projections[j].T)
            tail[1].weight.copy_(out.tail_weights[j])
    return ref


def test_shapes_and_registry() -> None:
    assert OUTPUTS["adaptive"] is AdaptiveSoftmax and AdaptiveSoftmax.capabilities == {"advsoft"}
    out = layer()
    assert out.dims == (16, 8, 4)
    assert out.head_weight.shape == (10, 16) and out.cluster_weight.shape == (2, 16) and out.head_projection is None
    assert [tuple(p.shape) for p in out.tail_projections] == [(16, 8), (16, 4)]
    assert [tuple(w.shape) for w in out.tail_weights] == [(20, 8), (30, 4)]


def test_equals_torch_adaptive_log_softmax_with_loss() -> None:
    out = layer().eval()
    ref = torch_reference(out)
    h = torch.randn(3, 8, D)
    y = targets_in_every_band((3, 8))
    torch.testing.assert_close(out.predict(wrap(h)), ref.log_prob(h.reshape(-1, D)).view(3, 8, V), rtol=1e-5, atol=1e-5)
    expected = ref(h.reshape(-1, D), y.reshape(-1))
    nll = out.score(wrap(h), y).nll
    torch.testing.assert_close(nll.reshape(-1), -expected.output, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(nll.mean(), expected.loss, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("training", [False, True])
def test_log_probs_normalize_over_the_full_vocabulary(training: bool) -> None:
    out = layer(tail_dropout=0.5).train(training)
    lp = out.predict(wrap(3 * torch.randn(4, 5, D)))
    assert lp.shape == (4, 5, V) and (lp <= 0).all()
    torch.testing.assert_close(lp.exp().sum(-1), torch.ones(4, 5), rtol=0, atol=1e-5)


def test_input_dropout_drops_what_the_head_and_the_tails_read_in_training_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """fairseq's AdaptiveSoftmax drops its input once (adaptive_softmax_dropout) before the head
    and the tail projections: the head sees ``h`` with about ``p`` of its entries zeroed and the
    rest scaled by ``1 / (1 - p)`` in training, ``h`` itself in evaluation; and the whole layer
    equals torch's adaptive softmax on that one dropped input."""
    p = 0.5
    out = layer(input_dropout=p)
    seen: list[torch.Tensor] = []
    head_logits = out.head_logits
    monkeypatch.setattr(out, "head_logits", lambda x: seen.append(x.detach().clone()) or head_logits(x))
    h, y = torch.randn(4, 50, D), targets_in_every_band((4, 50))
    flat = h.reshape(-1, D)
    ref = torch_reference(out).eval()

    out.train()
    torch.manual_seed(3)
    nll = out.score(wrap(h), y).nll
    dropped = seen[-1]
    kept = dropped != 0
    assert 0.4 < 1 - kept.float().mean().item() < 0.6
    torch.testing.assert_close(dropped[kept], flat[kept] / (1 - p))
    torch.manual_seed(3)
    expected_input = F.dropout(flat, p, True)
    torch.testing.assert_close(dropped, expected_input)
    torch.testing.assert_close(nll.reshape(-1), -ref(expected_input, y.reshape(-1)).output, rtol=1e-5, atol=1e-5)

    out.eval()
    nll = out.score(wrap(h), y).nll
    torch.testing.assert_close(seen[-1], flat, rtol=0, atol=0)
    torch.testing.assert_close(nll.reshape(-1), -ref(flat, y.reshape(-1)).output, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.predict(wrap(h)), ref.log_prob(flat).view(4, 50, V), rtol=1e-5, atol=1e-5)


def test_the_transformer_presets_drop_the_adaptive_softmax_input_as_the_authors_recipes() -> None:
    """fairseq's one adaptive_softmax_dropout sets both dropouts: 0.2 in transformer_lm_wiki103,
    0 in transformer_lm_gbw (and in Table 6's row without tail dropout)."""
    rates = {
        "transformer-wt103-adp-t": 0.2,
        "transformer-wt103-asm": 0.2,
        "transformer-wt103-asm-t-nodim": 0.2,
        "transformer-wt103-asm-tail-dropout0": 0.0,
        "transformer-gbw-adp-t": 0.0,
        "transformer-gbw-cnn": 0.0,
    }
    for preset, rate in rates.items():
        output = build_config(preset, []).model.output
        assert (output.softmax_input_dropout, output.tail_dropout) == (rate, rate), preset


@pytest.mark.parametrize("tie", ["none", "head"])
def test_score_equals_minus_predict_at_the_targets(tie: str) -> None:
    model = tied_model(tie)
    h, y = torch.randn(2, 9, D), targets_in_every_band((2, 9))
    for mode in ("eval", "train"):  # tail_dropout is 0 here, so training is deterministic too
        getattr(model.output, mode)()
        expected = -model.output.predict(wrap(h)).gather(-1, y.unsqueeze(-1)).squeeze(-1)
        torch.testing.assert_close(model.output.score(wrap(h), y).nll, expected, rtol=1e-5, atol=1e-5)


class Numels(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.numels: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        result = func(*args, **(kwargs or {}))
        self.numels += [t.numel() for t in tree_flatten(result)[0] if isinstance(t, torch.Tensor)]
        return result


def test_score_never_builds_an_n_by_v_tensor() -> None:
    out = AdaptiveSoftmax(D, 400, (10, 100), 2.0, tail_dropout=0.2, advsoft=AdvSoft(alpha=0.1))
    h = torch.randn(4, 16, D, requires_grad=True)
    y = torch.randint(0, 400, (4, 16))
    n = y.numel()
    with Numels() as probe:
        loss = out.score(wrap(h), y, adversarial=True).nll.sum()
        loss.backward()
    assert max(probe.numels) < n * 300
    with Numels() as probe:
        out.predict(wrap(h))
    assert max(probe.numels) >= n * 400  # the probe sees the full prediction


def tied_model(tie: str, advsoft: str = "none", **extra: str) -> LanguageModel:
    config = build_config(
        None,
        [
            "model.input=adaptive",
            f"model.input.dim={D}",
            "model.input.cutoffs=10,30",
            "model.input.factor=2",
            "model.input.dropout=0",
            "model.encoder.hidden_size=12",
            "model.encoder.num_layers=1",
            "model.output=adaptive",
            "model.output.cutoffs=10,30",
            "model.output.factor=2",
            f"model.output.tie={tie}",
            f"model.output.advsoft={advsoft}",
            *(f"{key}={value}" for key, value in extra.items()),
        ],
    )
    return LanguageModel(config.model, V)


SHARED = {  # (embeddings of bands 1..3, projections of bands 1..3) the output layer shares, per Table 7
    "none": ((False, False, False), (False, False, False)),
    "embeddings": ((True, True, True), (False, False, False)),
    "projections": ((True, True, True), (False, True, True)),
    "head": ((True, True, True), (True, True, True)),
}


def assert_sharing(model: LanguageModel, tie: str) -> None:
    inp, out = model.embedding, model.output
    emb_shared, proj_shared = SHARED[tie]
    own = [out.head_weight, *out.tail_weights]
    assert [a is b for a, b in zip(own, inp.weights)] == list(emb_shared)
    projections = [out.head_projection, *out.tail_projections]
    assert [a is b for a, b in zip(projections, inp.projections)] == list(proj_shared)
    assert (out.head_projection is not None) == (tie == "head")
    input_ids = {id(p) for p in inp.parameters()}
    shared = [p for p in out.parameters() if id(p) in input_ids]
    assert len(shared) == sum(emb_shared) + sum(proj_shared)  # nothing else is shared
    assert id(out.cluster_weight) not in input_ids
    split = model.parameter_split()
    assert split["output"] == sum(p.numel() for p in out.parameters() if id(p) not in input_ids)


@pytest.mark.parametrize("tie", list(SHARED))
def test_each_tie_option_shares_what_table7_says_and_keeps_it_through_a_checkpoint(tie: str, tmp_path: Path) -> None:
    model = tied_model(tie)
    assert_sharing(model, tie)
    config = build_config(
        None,
        [
            "model.input=adaptive",
            f"model.input.dim={D}",
            "model.input.cutoffs=10,30",
            "model.input.factor=2",
            "model.encoder.hidden_size=12",
            "model.encoder.num_layers=1",
            "model.output=adaptive",
            "model.output.cutoffs=10,30",
            "model.output.factor=2",
            f"model.output.tie={tie}",
        ],
    )
    model = LanguageModel(config.model, V)
    vocab = Vocab([f"w{i}" for i in range(V - 1)] + ["<eos>"], list(range(V, 0, -1)))
    save_model_dir(tmp_path / "m", model, config, vocab)
    loaded, loaded_config, _ = load_model_dir(tmp_path / "m")
    assert loaded_config.model.output.tie == tie
    assert_sharing(loaded, tie)
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_tied_head_projection_is_applied_before_the_head_word_embeddings() -> None:
    model = tied_model("head")
    out, inp = model.output, model.embedding
    h = torch.randn(5, D)
    expected = torch.cat([(h @ inp.projections[0]) @ inp.weights[0].T, h @ out.cluster_weight.T], dim=-1)
    torch.testing.assert_close(out.head_logits(h), expected)


def direct_adversarial_nll(out: AdaptiveSoftmax, h: torch.Tensor, y: torch.Tensor, adv: AdvSoft) -> torch.Tensor:
    """Token by token: lower the target's head row and, for a tail word, its row in the cluster."""

    def eps(row: torch.Tensor) -> float:
        return adv.alpha * float(row.norm()) if adv.mode == "relative" else adv.epsilon

    head_rows = torch.cat([out.head_weight, out.cluster_weight])
    nll = []
    for x, word in zip(h, y.tolist()):
        band = sum(word >= c for c in out.cutoffs)
        entry = word if band == 0 else out.cutoffs[0] + band - 1
        reads = x @ out.head_projection if band == 0 and out.head_projection is not None else x
        z = out.head_logits(x[None])[0].clone()
        z[entry] -= eps(head_rows[entry]) * float(reads.norm())
        lp = F.log_softmax(z, -1)[entry]
        if band > 0:
            x_i = x @ out.tail_projections[band - 1]
            local = word - out.bounds[band]
            u = out.tail_weights[band - 1] @ x_i
            u[local] -= eps(out.tail_weights[band - 1][local]) * float(x_i.norm())
            lp = lp + F.log_softmax(u, -1)[local]
        nll.append(-lp)
    return torch.stack(nll)


@pytest.mark.parametrize(("tie", "mode"), [("none", "relative"), ("head", "relative"), ("projections", "fixed")])
def test_advsoft_equals_a_direct_computation_and_only_lowers_target_probabilities(tie: str, mode: str) -> None:
    model = tied_model(
        tie, advsoft=mode, **{"model.output.advsoft.alpha": "0.3", "model.output.advsoft.epsilon": "0.4"}
    )
    out = model.output.eval()
    h, y = 2 * torch.randn(3, 7, D), targets_in_every_band((3, 7))
    with torch.no_grad():
        adversarial = out.score(wrap(h), y, adversarial=True).nll
        clean = out.score(wrap(h), y).nll
        expected = direct_adversarial_nll(out, h.reshape(-1, D), y.reshape(-1), out.advsoft).view(3, 7)
    torch.testing.assert_close(adversarial, expected, rtol=1e-5, atol=1e-5)
    assert (adversarial > clean).all()


def test_clean_path_is_unchanged_with_advsoft_on() -> None:
    plain = layer()
    with_adv = layer(advsoft=AdvSoft(alpha=0.5))
    with_adv.load_state_dict(plain.state_dict())
    h, y = torch.randn(2, 6, D), targets_in_every_band((2, 6))
    torch.testing.assert_close(with_adv.score(wrap(h), y).nll, plain.score(wrap(h), y).nll, rtol=0, atol=0)
    torch.testing.assert_close(with_adv.predict(wrap(h)), plain.predict(wrap(h)), rtol=0, atol=0)
    with pytest.raises(ValueError, match="advsoft"):
        plain.score(wrap(h), y, adversarial=True)


def test_adversarial_gradient_reaches_every_used_parameter() -> None:
    model = tied_model("projections", advsoft="relative")
    h = torch.randn(2, 8, D, requires_grad=True)
    model.output.score(wrap(h), targets_in_every_band((2, 8)), adversarial=True).nll.sum().backward()
    out = model.output
    for p in [out.head_weight, out.cluster_weight, *out.tail_projections, *out.tail_weights, h]:
        assert p.grad is not None and p.grad.abs().sum() > 0 and torch.isfinite(p.grad).all()


def test_full_logits_and_kept_logits_are_refused() -> None:
    out = layer()
    h = torch.randn(1, 2, D)
    with pytest.raises(ReglmError, match="no full logits"):
        out.full_logits(wrap(h))
    with pytest.raises(ValueError, match="softmax-logits"):
        out.score(wrap(h), torch.zeros(1, 2, dtype=torch.long), keep_logits=True)


ADAPTIVE_IN = [
    "model.input=adaptive",
    "model.input.dim=16",
    "model.input.cutoffs=10,30",
    "model.input.factor=2",
    "model.output=adaptive",
]


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (["model.output.cutoffs=30,10"], "invalid option model.output.cutoffs: .*strictly increasing"),
        (["model.output.cutoffs=10,x"], "invalid option model.output.cutoffs"),
        (
            ["model.output.cutoffs=10,30", "model.output.factor=2", "model.output.tail_dropout=1"],
            "invalid option model.output.tail_dropout",
        ),
        (
            ["model.output.cutoffs=10,30", "model.output.factor=2", "model.output.softmax_input_dropout=-0.1"],
            "invalid option model.output.softmax_input_dropout",
        ),
        (
            ["model.output.cutoffs=10,30", "model.output.factor=2", "model.output.tie=weights"],
            "invalid option model.output.tie: unknown 'weights'",
        ),
        (
            ["model.output.cutoffs=10,30,40", "model.output.factor=4", "model.output.tie=none"],
            "invalid option model.output.factor: band 4 of 4",
        ),
        (
            ["model.output.cutoffs=10,20", "model.output.factor=2"],
            "invalid option model.output.cutoffs: .*differs from model.input.cutoffs",
        ),
        (
            ["model.output.cutoffs=10,30", "model.output.factor=4"],
            "invalid option model.output.factor: .*differs from model.input.factor",
        ),
        (
            ["model.output.cutoffs=10,30", "model.output.factor=2", "model.encoder.last_hidden_size=8"],
            "invalid option model.output.tie: .*8 features",
        ),
        (
            ["model.output.cutoffs=10,30", "model.output.factor=2", "train.aug_gamma=1"],
            "invalid option train.terms.aug_gamma",
        ),
    ],
)
def test_bad_options_are_config_errors(overrides: list[str], fragment: str) -> None:
    with pytest.raises(ReglmError, match=fragment):
        build_config(None, [*ADAPTIVE_IN, *overrides])


@pytest.mark.parametrize("tie", ["projections", "head"])
def test_tying_projections_to_a_word_embedding_is_a_config_error(tie: str) -> None:
    with pytest.raises(
        ReglmError,
        match=f"invalid option model.output.tie: tie={tie} shares parameters with an adaptive input, not with "
        "input layer embedding",
    ):
        build_config(
            None,
            [
                "model.input.emb_size=16",
                "model.output=adaptive",
                "model.output.cutoffs=10,30",
                f"model.output.tie={tie}",
            ],
        )


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (
            ["model.output.factor=4"],
            "invalid option model.output.factor: 4: a word embedding has one size for every word",
        ),
        (["model.output.factor=1", "model.input.emb_size=8"], "ties to a word embedding of size 8"),
    ],
)
def test_tying_embeddings_to_a_word_embedding_needs_factor_1_and_its_size(overrides: list[str], fragment: str) -> None:
    with pytest.raises(ReglmError, match=fragment):
        build_config(
            None,
            [
                "model.input.emb_size=16",
                "model.encoder.last_hidden_size=16",
                "model.output=adaptive",
                "model.output.cutoffs=10,30",
                "model.output.tie=embeddings",
                *overrides,
            ],
        )


WORD_TIED = [
    "model.input.emb_size=16",
    "model.encoder.hidden_size=12",
    "model.encoder.num_layers=1",
    "model.encoder.last_hidden_size=16",
    "model.output=adaptive",
    "model.output.cutoffs=10,30",
    "model.output.factor=1",
    "model.output.tie=embeddings",
]
"""Table 7's "512d Adaptive (no dim reduction, tied)" at toy size"""


def test_a_word_embedding_tied_at_factor_1_is_the_softmax_of_its_rows(tmp_path: Path) -> None:
    """Every band's embedding is the embedding matrix's rows (one Parameter, kept through a
    checkpoint); the layer equals torch's module with those rows copied in, and normalizes."""
    config = build_config(None, WORD_TIED)
    model = LanguageModel(config.model, V).eval()
    out, emb = model.output, model.embedding.weight
    assert out.tied_matrix is emb and out.dims == (16, 16, 16)
    assert (
        sum(p.numel() for p in out.parameters() if p is not emb)
        == model.parameter_split()["output"]
        == 2 * 16 * 16 + 2 * 16
    )
    ref = torch.nn.AdaptiveLogSoftmaxWithLoss(16, V, [10, 30], div_value=1.0, head_bias=False)
    with torch.no_grad():
        ref.head.weight.copy_(torch.cat([emb[:10], out.cluster_weight]))
        for j, tail in enumerate(ref.tail):
            tail[0].weight.copy_(out.tail_projections[j].T)
            tail[1].weight.copy_(emb[out.bounds[j + 1] : out.bounds[j + 2]])
    h, y = torch.randn(40, 16), torch.randint(0, V, (40,))
    torch.testing.assert_close(out.nll_of(h, y), -ref(h, y).output, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.log_probs(h), ref.log_prob(h), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.log_probs(h).exp().sum(-1), torch.ones(40), rtol=1e-5, atol=1e-5)
    out.nll_of(h, y).sum().backward()
    assert emb.grad is not None and emb.grad[:10].abs().sum() > 0
    vocab = Vocab([f"w{i}" for i in range(V - 1)] + ["<eos>"], list(range(V, 0, -1)))
    save_model_dir(tmp_path / "m", model, config, vocab)
    loaded, _, _ = load_model_dir(tmp_path / "m")
    assert loaded.output.tied_matrix is loaded.embedding.weight
    torch.testing.assert_close(loaded.embedding.weight, emb, rtol=0, atol=0)


def test_untied_adaptive_softmax_over_a_word_embedding_is_allowed() -> None:
    config = build_config(
        None,
        ["model.input.emb_size=16", "model.output=adaptive", "model.output.cutoffs=10,30", "model.output.tie=none"],
    )
    model = LanguageModel(config.model, V)
    assert model.output.dims == (16, 4, 1)
    assert model.output.nll(model(torch.randint(0, V, (2, 3))), torch.randint(0, V, (2, 3))).shape == (2, 3)


def test_cutoffs_beyond_the_vocabulary_are_a_config_error_at_build_time() -> None:
    config = build_config(
        None,
        ["model.input.emb_size=16", "model.output=adaptive", "model.output.cutoffs=10,60", "model.output.tie=none"],
    )
    with pytest.raises(ReglmError, match="invalid option model.output.cutoffs: .*beyond the vocabulary of 60 words"):
        LanguageModel(config.model, V)


def test_a_tiny_run_trains_with_adaptive_input_and_adaptive_softmax(tmp_path: Path) -> None:
    from reglm.train.run import train

    config = build_config(
        "tiny",
        [
            "data.synthetic_sentences=100",
            "train.epochs=1",
            "train.finetune=false",
            "model.input=adaptive",
            "model.input.dim=24",
            "model.input.cutoffs=200,500",
            "model.input.factor=2",
            "model.output=adaptive",
            "model.output.cutoffs=200,500",
            "model.output.factor=2",
            "model.output.tie=projections",
            "model.output.tail_dropout=0.2",
            "model.output.advsoft=relative",
        ],
    )
    assert config.model.input.dropout == 0.2  # the preset's input dropout carries over to the adaptive input
    results = train(config, tmp_path / "run", progress=False)
    assert math.isfinite(results["test"]["ppl"]) and results["test"]["ppl"] < 1001
    model, _, _ = load_model_dir(tmp_path / "run" / "best")
    assert_sharing(model, "projections")
