"""Mixture of softmaxes (Yang et al. 2018) and DOC (Takase et al. 2018): normalization, direct
per-expert references, log-space mixing, AdvSoft per expert, the DOC penalty, gradient
accumulation, end-to-end training with exact resume, configuration errors."""

from __future__ import annotations

import copy
import math
import signal
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from reglm.cli import main
from reglm.config import ModelConfig, build_config
from reglm.data import load_corpus
from reglm.errors import ReglmError
from reglm.models import LanguageModel
from reglm.outputs.adversarial import AdvSoft
from reglm.outputs.mixture import MixtureOfSoftmaxes, mixture_weight_penalty
from reglm.train.checkpoint import load_state
from reglm.train.run import StopRequest, Trainer, TrainingInterrupted, resume, train

V = 23
NO_DROPOUT = dict(
    embed_dropout=0.0, input_dropout=0.0, hidden_dropout=0.0, output_dropout=0.0, weight_dropout=0.0, latent_dropout=0.0
)


def _cfg(**kw) -> ModelConfig:
    base = dict(
        emb_size=6,
        hidden_size=10,
        last_hidden_size=9,
        num_layers=3,
        output="mos",
        n_experts=4,
        latent_dropout=0.3,
        embed_dropout=0.1,
        input_dropout=0.2,
        hidden_dropout=0.2,
        output_dropout=0.2,
        weight_dropout=0.3,
    )
    return ModelConfig.build(**{**base, **kw})


def _layer(
    n_experts: int, extra_inputs=(), advsoft: AdvSoft | None = None, in_features: int = 5, emb: int = 4, vocab: int = 11
) -> MixtureOfSoftmaxes:
    torch.manual_seed(3)
    layer = MixtureOfSoftmaxes(
        in_features, emb, vocab, n_experts, 0.0, advsoft=advsoft, extra_inputs=extra_inputs
    ).double()
    with torch.no_grad():
        layer.bias.normal_()
        layer.weight.normal_()
    return layer.eval()


def _direct_experts(layer: MixtureOfSoftmaxes, h: torch.Tensor, extra=()) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Independent computation: pi (N, K) and the latent vectors, one (N, E) per expert, in expert order."""
    e = layer.emb_size
    flat = h.reshape(-1, h.size(-1))
    pi = torch.softmax(flat @ layer.prior.weight.t(), dim=-1)
    latents = []
    for proj, x in [(layer.latent, flat), *zip(layer.extra_latents, [t.reshape(-1, t.size(-1)) for t in extra])]:
        for k in range(proj.out_features // e):
            rows = slice(k * e, (k + 1) * e)
            latents.append(torch.tanh(x @ proj.weight[rows].t() + proj.bias[rows]))
    return pi, latents


def _direct_log_probs(layer: MixtureOfSoftmaxes, h: torch.Tensor, extra=()) -> torch.Tensor:
    """log sum_k pi_k softmax(W h_k + b), mixing probabilities (fine for moderate logits)."""
    pi, latents = _direct_experts(layer, h, extra)
    probs = sum(
        pi[:, k : k + 1] * torch.softmax(hk @ layer.weight.t() + layer.bias, dim=-1) for k, hk in enumerate(latents)
    )
    return probs.log().view(*h.shape[:-1], -1)


# ------------------------------------------------------------------ the mixture


@pytest.mark.parametrize("output, doc", [("mos", None), ("doc", "2,1")])
def test_probabilities_sum_to_one_and_nll_matches(output: str, doc: str | None) -> None:
    model = LanguageModel(_cfg(output=output, doc_experts=doc), V).eval()
    ids, targets = torch.randint(0, V, (3, 7)), torch.randint(0, V, (3, 7))
    with torch.no_grad():
        lp, _ = model.log_probs(ids)
        nll, _ = model.nll(ids, targets)
    assert lp.shape == (3, 7, V)
    torch.testing.assert_close(lp.exp().sum(-1), torch.ones(3, 7), rtol=0, atol=1e-5)
    torch.testing.assert_close(nll, -lp.gather(-1, targets.unsqueeze(-1)).squeeze(-1), rtol=1e-5, atol=1e-5)
    model.train()
    with torch.no_grad():
        torch.manual_seed(9)
        lp_train, _ = model.log_probs(ids)
        torch.manual_seed(9)
        nll_train, _ = model.nll(ids, targets)
    torch.testing.assert_close(lp_train.exp().sum(-1), torch.ones(3, 7), rtol=0, atol=1e-5)
    torch.testing.assert_close(nll_train, -lp_train.gather(-1, targets.unsqueeze(-1)).squeeze(-1), rtol=1e-5, atol=1e-5)


def test_one_expert_is_a_softmax_over_the_tied_embedding_of_the_projected_state() -> None:
    model = LanguageModel(_cfg(n_experts=1), V).eval()
    assert model.output.weight is model.embedding.weight
    h = torch.randn(2, 5, 9)
    with torch.no_grad():
        got = model.output.log_probs(h)
        projected = torch.tanh(h @ model.output.latent.weight.t() + model.output.latent.bias)
        expected = torch.log_softmax(projected @ model.embedding.weight.t() + model.output.bias, dim=-1)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("extra_inputs", [(), ((7, 2), (3, 1))])
def test_mixture_equals_a_direct_per_expert_computation(extra_inputs) -> None:
    layer = _layer(3, extra_inputs)
    h = torch.randn(2, 4, 5, dtype=torch.float64)
    extra = [torch.randn(2, 4, f, dtype=torch.float64) for f, _ in extra_inputs]
    targets = torch.randint(0, 11, (2, 4))
    with torch.no_grad():
        expected = _direct_log_probs(layer, h, extra)
        torch.testing.assert_close(layer.log_probs(h, extra), expected)
        torch.testing.assert_close(
            layer.nll_of(h, targets, extra=extra), -expected.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        )
        pi, _ = _direct_experts(layer, h, extra)
        torch.testing.assert_close(layer.mix_score(h, targets, extra=extra).weights, pi.view(2, 4, -1))


def test_doc_experts_read_the_intermediate_layers() -> None:
    model = LanguageModel(_cfg(output="doc", doc_experts="2,1"), V).eval()
    assert model.output.total_experts == 4 + 3 and model.output.extra_layers == [0, 1]
    ids = torch.randint(0, V, (2, 6))
    with torch.no_grad():
        out = model(ids)
        got = model.output.predict(out)
        expected = _direct_log_probs(model.output, out.output, out.layer_outputs[:2])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_doc_with_no_extra_experts_is_mos() -> None:
    mos = LanguageModel(_cfg(), V)
    doc = LanguageModel(_cfg(output="doc", doc_experts="0,0"), V)
    assert doc.state_dict().keys() == mos.state_dict().keys()
    doc.load_state_dict(mos.state_dict())
    ids, targets = torch.randint(0, V, (3, 5)), torch.randint(0, V, (3, 5))
    for mode in (False, True):
        mos.train(mode), doc.train(mode)
        with torch.no_grad():
            torch.manual_seed(4)
            a = mos.log_probs(ids)[0], mos.nll(ids, targets)[0]
            torch.manual_seed(4)
            b = doc.log_probs(ids)[0], doc.nll(ids, targets)[0]
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_log_space_mixing_keeps_what_probability_mixing_underflows() -> None:
    """Targets about 200 nats below the best word in every expert: float32 probabilities are 0."""
    layer = MixtureOfSoftmaxes(3, 2, 4, 2, 0.0)
    with torch.no_grad():
        layer.latent.weight.zero_()
        layer.latent.bias.copy_(torch.tensor([3.0, 0.0, 0.0, 3.0]))  # tanh(3) ~ 0.995 on one axis per expert
        layer.weight.copy_(torch.tensor([[200.0, 0.0], [0.0, 200.0], [-10.0, -10.0], [1.0, 1.0]]))
        layer.prior.weight.copy_(torch.tensor([[0.3, 0.0, 0.0], [0.0, 0.0, 0.0]]))
    h = torch.ones(1, 1, 3, requires_grad=True)
    targets = torch.tensor([[2]])
    nll = layer.nll_of(h, targets)
    expected = -_direct_log_probs_log_space(copy.deepcopy(layer).double(), h.detach().double(), targets)
    torch.testing.assert_close(nll.detach().double(), expected, rtol=1e-5, atol=0)
    assert float(nll.detach()) > 150
    with torch.no_grad():
        pi, latents = _direct_experts(layer, h)
        naive = sum(
            pi[:, k] * torch.softmax(hk @ layer.weight.t() + layer.bias, dim=-1)[:, 2] for k, hk in enumerate(latents)
        )
    assert float(naive) == 0.0, "probability mixing underflows in float32 here"
    nll.sum().backward()
    assert torch.isfinite(h.grad).all() and all(torch.isfinite(p.grad).all() for p in layer.parameters())


def _direct_log_probs_log_space(layer: MixtureOfSoftmaxes, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    pi, latents = _direct_experts(layer, h)
    terms = torch.stack(
        [
            pi[:, k].log() + torch.log_softmax(hk @ layer.weight.t() + layer.bias, dim=-1)[:, int(targets)]
            for k, hk in enumerate(latents)
        ]
    )
    return torch.logsumexp(terms, dim=0).view(targets.shape)


# ------------------------------------------------------------------ AdvSoft per expert


@pytest.mark.parametrize(
    "advsoft", [AdvSoft(mode="fixed", epsilon=0.7), AdvSoft(mode="relative", alpha=0.4)], ids=["fixed", "relative"]
)
def test_advsoft_perturbs_each_expert_before_mixing(advsoft: AdvSoft) -> None:
    layer = _layer(3, ((7, 2),), advsoft)
    h = torch.randn(2, 5, 5, dtype=torch.float64)
    extra = [torch.randn(2, 5, 7, dtype=torch.float64)]
    targets = torch.tensor([[3, 3, 1, 3, 0], [1, 1, 4, 3, 10]])
    params = [layer.prior.weight, layer.latent.weight, layer.weight, layer.bias]
    got = layer.nll_of(h, targets, adversarial=True, extra=extra)
    got_grads = torch.autograd.grad(got.sum(), params)

    pi, latents = _direct_experts(layer, h, extra)
    flat_y = targets.reshape(-1)
    mixed = []
    for n in range(flat_y.numel()):
        y = int(flat_y[n])
        eps = advsoft.epsilon if advsoft.mode == "fixed" else advsoft.alpha * layer.weight[y].norm()
        probs = 0
        for k, hk in enumerate(latents):
            logits = hk[n] @ layer.weight.t() + layer.bias
            margin = (eps * hk[n].norm()).detach()
            logits = logits - margin * F.one_hot(torch.tensor(y), 11)
            probs = probs + pi[n, k] * torch.softmax(logits, dim=0)[y]
        mixed.append(-probs.log())
    expected = torch.stack(mixed).view(targets.shape)
    torch.testing.assert_close(got, expected)
    for a, b in zip(got_grads, torch.autograd.grad(expected.sum(), params)):
        torch.testing.assert_close(a, b)
    with torch.no_grad():
        assert torch.all(got > layer.nll_of(h, targets, extra=extra)), (
            "the adversary only lowers the target's probability"
        )


def test_advsoft_mixture_evaluates_clean() -> None:
    plain = LanguageModel(_cfg(), V)
    adv = LanguageModel(_cfg(advsoft="relative", advsoft_alpha=1.0), V)
    adv.load_state_dict(plain.state_dict())
    plain.eval(), adv.eval()
    ids = torch.randint(0, V, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(adv.log_probs(ids)[0], plain.log_probs(ids)[0], rtol=0, atol=0)
        torch.testing.assert_close(adv.nll(ids, ids)[0], plain.nll(ids, ids)[0], rtol=0, atol=0)
        out = adv(ids)
        assert torch.all(adv.output.score(out, ids, adversarial=True).nll > adv.output.nll(out, ids))


# ------------------------------------------------------------------ the DOC penalty


def test_doc_penalty_equals_its_formula() -> None:
    weights = torch.softmax(torch.randn(3, 5, 4, dtype=torch.float64) * 2, dim=-1)
    beta = weights.sum(dim=1)
    entries = beta.reshape(-1)
    mean = entries.sum() / entries.numel()
    var = ((entries - mean) ** 2).sum() / (entries.numel() - 1)
    torch.testing.assert_close(mixture_weight_penalty(weights), (4 - 1) * var / mean**2)
    assert float(mixture_weight_penalty(torch.full((3, 5, 4), 0.25))) == 0.0
    assert float(mixture_weight_penalty(torch.ones(1, 5, 1))) == 0.0


def test_model_adds_the_weighted_penalty_of_its_mixture_weights() -> None:
    model = LanguageModel(_cfg(output="doc", doc_experts="0,2", mixture_penalty=0.01, **NO_DROPOUT), V).train()
    ids, targets = torch.randint(0, V, (3, 6)), torch.randint(0, V, (3, 6))
    out = model(ids)
    loss = model.output.score(out, targets)
    pi = torch.softmax(out.output @ model.output.prior.weight.t(), dim=-1)
    torch.testing.assert_close(loss.penalty, 0.01 * mixture_weight_penalty(pi))
    torch.testing.assert_close(loss.nll, model.output.nll(out, targets))
    (grad,) = torch.autograd.grad(loss.penalty, model.output.prior.weight)
    assert grad.abs().sum() > 0
    plain = LanguageModel(ModelConfig.build(emb_size=6, hidden_size=10, num_layers=2), V)
    assert float(plain.output.score(plain(ids), targets).penalty) == 0.0


def test_the_penalty_reaches_the_training_step(tmp_path: Path) -> None:
    overrides = ["data.synthetic_sentences=16", "model.output=doc", "model.doc_experts=2", "train.variable_bptt=false"]
    weights = []
    for lam in (0.0, 5.0):
        config = build_config("mos-tiny", [*overrides, f"model.mixture_penalty={lam}"])
        trainer = Trainer(config, tmp_path / f"run{lam}", load_corpus(config), progress=False)
        trainer._train_epoch()
        weights.append(trainer.model.output.prior.weight.detach().clone())
    assert not torch.allclose(weights[0], weights[1])


# ------------------------------------------------------------------ gradient accumulation and training


def _one_step_grads(tmp_path: Path, small_batch: int) -> tuple[dict[str, torch.Tensor], Trainer]:
    overrides = [
        f"{k}=0"
        for k in (
            "embed_dropout",
            "input_dropout",
            "hidden_dropout",
            "output_dropout",
            "weight_dropout",
            "latent_dropout",
        )
    ]
    overrides += [
        "data.synthetic_sentences=8",
        "train.variable_bptt=false",
        "train.bptt=12",
        f"train.small_batch_size={small_batch}",
        "train.clip=0",
    ]
    config = build_config("mos-tiny", overrides)
    trainer = Trainer(config, tmp_path / f"run{small_batch}", load_corpus(config), progress=False)
    trainer._train_epoch()
    assert trainer.step == 1
    return {name: p.grad for name, p in trainer.model.named_parameters()}, trainer


def test_gradient_accumulation_equals_the_full_batch_without_dropout(tmp_path: Path) -> None:
    full, full_trainer = _one_step_grads(tmp_path, 8)
    chunked, chunked_trainer = _one_step_grads(tmp_path, 2)
    assert len(chunked_trainer.engine.chunks_of(8)) == 4
    for name in full:
        torch.testing.assert_close(chunked[name], full[name], rtol=1e-4, atol=1e-6, msg=name)
    for (h1, c1), (h2, c2) in zip(full_trainer.hidden.layers, chunked_trainer.hidden.layers):
        assert h1.shape == h2.shape == (1, 8, h1.size(-1))
        torch.testing.assert_close(h2, h1, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(c2, c1, rtol=1e-5, atol=1e-6)
    assert chunked_trainer.epoch_nll == pytest.approx(full_trainer.epoch_nll, rel=1e-5)


def test_mos_tiny_trains_and_resumes_bit_exactly(tmp_path: Path) -> None:
    """Interrupted mid-epoch (the chunks' carried states in state.pt), resumed, compared with an uninterrupted run."""
    config = build_config("mos-tiny", ["data.synthetic_sentences=200", "train.epochs=2", "train.finetune_epochs=1"])
    reference = tmp_path / "reference"
    results = train(config, reference, progress=False)
    assert math.isfinite(results["test"]["ppl"]) and results["test"]["ppl"] < 1001

    run = tmp_path / "run"
    stop = StopRequest()
    trainer = Trainer(config, run, load_corpus(config), progress=False, stop=stop)
    trainer.start()
    step = trainer.optimizer.step

    def step_then_stop(*args, **kwargs):
        result = step(*args, **kwargs)
        if trainer.step == 30:
            stop.request(signal.SIGINT)
        return result

    trainer.optimizer.step = step_then_stop
    with pytest.raises(TrainingInterrupted):
        trainer.run()
    state = load_state(run / "state.pt")
    assert (state["stage"], state["epoch"]) == ("main", 1) and state["position"] > 0
    assert state["hidden"][0][0].shape[1] == config.train.batching.batch_size
    resume(run, progress=False)
    for sub in ("best", "last"):
        a, b = load_file(str(reference / sub / "model.safetensors")), load_file(str(run / sub / "model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), sub


# ------------------------------------------------------------------ configuration


def test_last_hidden_size_sets_the_last_layer() -> None:
    model = LanguageModel(_cfg(), V)
    out = model(torch.randint(0, V, (2, 3)))
    assert out.output.shape == (2, 3, 9) and out.state.layers[-1][0].shape == (1, 2, 9)
    assert model.output.latent.in_features == 9 and model.output.weight.shape == (V, 6)
    untied = LanguageModel(ModelConfig.build(emb_size=6, hidden_size=10, last_hidden_size=9, tie_weights=False), V)
    assert untied.output.weight.shape == (V, 9)


@pytest.mark.parametrize(
    "override, option",
    [
        ("model.n_experts=0", "model.output.n_experts"),
        ("model.latent_dropout=1.0", "model.output.latent_dropout"),
        ("model.latent_dropout=-0.1", "model.output.latent_dropout"),
        ("model.output=moe", "model.output"),
        ("model.last_hidden_size=0", "model.encoder.last_hidden_size"),
        ("model.doc_experts=1,2", "model.output.doc_experts"),
        ("model.doc_experts=x", "model.output.doc_experts"),
        ("model.mixture_penalty=-1", "model.output.mixture_penalty"),
        ("train.small_batch_size=3", "train.batching.small_batch_size"),
    ],
)
def test_bad_mixture_options_name_the_option(override: str, option: str) -> None:
    extra = ["model.output=doc"] if option == "model.output.doc_experts" else []
    with pytest.raises(ReglmError, match=option):
        build_config("mos-tiny", [*extra, override])


@pytest.mark.parametrize(
    "bad, option, fixed",
    [
        (["model.last_hidden_size=20"], "last_hidden_size", ["model.last_hidden_size=20", "model.tie_weights=false"]),
        (
            ["model.mixture_penalty=0.1"],
            "model.output.mixture_penalty",
            ["model.mixture_penalty=0.1", "model.output=mos"],
        ),
        (
            ["model.output=mos", "model.doc_experts=3"],
            "model.output.doc_experts",
            ["model.output=doc", "model.doc_experts=3"],
        ),
    ],
)
def test_options_that_do_not_fit_the_output_layer(bad: list[str], option: str, fixed: list[str]) -> None:
    with pytest.raises(ReglmError, match=option):
        build_config("tiny", bad)
    build_config("tiny", fixed)


def test_bad_option_on_the_command_line_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    assert main(["train", "--preset", "mos-tiny", "--out", str(out), "model.n_experts=0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("reglm: error:") and "model.output.n_experts" in err and "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize("name", ["mos-awd-lstm-ptb", "mos-awd-lstm-wt2", "mos-advsoft-ptb", "mos-advsoft-wt2"])
def test_mos_presets_follow_their_sources(name: str) -> None:
    cfg = build_config(name)
    i, e, o, t = cfg.model.input, cfg.model.encoder, cfg.model.output, cfg.train
    ptb = "ptb" in name
    assert (o.kind, o.n_experts, e.num_layers, o.tie_weights) == ("mos", 15, 3, True)
    assert (e.hidden_size, e.last_hidden_size, i.emb_size) == ((960, 620, 280) if ptb else (1150, 650, 300))
    assert (i.dropout, e.hidden_dropout, o.latent_dropout) == ((0.4, 0.225, 0.29) if ptb else (0.55, 0.2, 0.29))
    assert (e.output_dropout, i.embed_dropout, e.weight_dropout) == (0.4, 0.1, 0.5)
    assert (t.optimizer.lr, t.batching.batch_size, t.batching.small_batch_size, t.batching.bptt_max) == (
        (20.0, 12, None, 110) if ptb else (15.0, 15, 5, 90)
    )
    assert (
        t.epochs,
        t.finetune.enabled,
        t.batching.bptt,
        t.clip,
        t.batching.eval_batch_size,
        t.batching.test_batch_size,
    ) == (
        1000,
        True,
        70,
        0.25,
        10,
        1,
    )
    assert cfg.seed == (28 if ptb else 1882)
    if "advsoft" in name:
        assert (o.advsoft.kind, o.advsoft.alpha, t.input_noise.std, t.finetune.input_noise_std) == (
            "relative",
            0.005,
            0.15,
            0.0,
        )
