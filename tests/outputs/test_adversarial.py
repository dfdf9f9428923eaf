"""The adversarial softmax (Wang, Gong & Liu 2019): closed form, theory, gradients, options, training."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from reglm.cli import main
from reglm.config import ModelConfig, build_config
from reglm.errors import ReglmError
from reglm.evaluate.perplexity import evaluate
from reglm.metrics import read_metrics
from reglm.models import LanguageModel
from reglm.optim.schedules import annealed_std
from reglm.outputs.adversarial import AdvSoft
from reglm.outputs.softmax import SoftmaxOutput
from reglm.train.run import train


def _instance(seed: int, vocab: int = 7, dim: int = 5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(vocab, dim, generator=g, dtype=torch.float64)
    h = torch.randn(dim, generator=g, dtype=torch.float64) * 2
    b = torch.randn(vocab, generator=g, dtype=torch.float64) * 0.1
    return w, h, b


def _closed_form_log_prob(w: torch.Tensor, h: torch.Tensor, b: torch.Tensor, i: int, eps: float) -> torch.Tensor:
    """log AdvSoft_eps(i; w, h), eq. (7), written out directly."""
    logits = w @ h + b
    logits[i] = logits[i] - eps * h.norm()
    return torch.log_softmax(logits, 0)[i]


def _project(delta: torch.Tensor, radius: float) -> torch.Tensor:
    norms = delta.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    return delta * torch.clamp(radius / norms, max=1.0)


def _min_over_ball(
    w: torch.Tensor, h: torch.Tensor, b: torch.Tensor, i: int, radius: float, rows: list[int], seed: int
) -> float:
    """min over ||delta_j|| <= radius (j in rows) of log softmax_i(w + delta), by projected gradient
    (each row's step normalized on its own, so rows with tiny gradients still converge)."""
    g = torch.Generator().manual_seed(seed)
    delta = _project(torch.randn(len(rows), w.size(1), generator=g, dtype=torch.float64), radius).requires_grad_(True)
    for _ in range(500):
        perturbed = w.clone()
        perturbed[rows] = perturbed[rows] + delta
        value = torch.log_softmax(perturbed @ h + b, 0)[i]
        (grad,) = torch.autograd.grad(value, delta)
        with torch.no_grad():
            delta.copy_(_project(delta - 0.05 * grad / grad.norm(dim=1, keepdim=True).clamp_min(1e-300), radius))
    with torch.no_grad():
        perturbed = w.clone()
        perturbed[rows] = perturbed[rows] + delta
        return float(torch.log_softmax(perturbed @ h + b, 0)[i])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_closed_form_equals_brute_force_over_the_target_ball(seed: int) -> None:
    w, h, b = _instance(seed)
    i, eps = seed % w.size(0), 0.7
    brute = _min_over_ball(w, h, b, i, eps, [i], seed)
    assert brute == pytest.approx(float(_closed_form_log_prob(w, h, b, i, eps)), abs=1e-6)


@pytest.mark.parametrize("seed", [3, 4])
def test_theorem_3_1_perturbing_every_word_with_half_the_radius_is_the_same(seed: int) -> None:
    w, h, b = _instance(seed)
    i, eps = 2, 0.9
    brute_all = _min_over_ball(w, h, b, i, eps / 2, list(range(w.size(0))), seed)
    assert brute_all == pytest.approx(float(_closed_form_log_prob(w, h, b, i, eps)), abs=1e-6)


def test_output_layer_nll_matches_equation_7_per_token() -> None:
    """Each token gets its own margin, repeated words included; fixed and relative epsilon."""
    torch.manual_seed(0)
    vocab, dim = 11, 6
    weight = torch.nn.Parameter(torch.randn(vocab, dim))
    h = torch.randn(2, 5, dim)
    targets = torch.tensor([[3, 3, 1, 3, 0], [1, 1, 4, 3, 10]])
    for advsoft, eps_of in (
        (AdvSoft(mode="fixed", epsilon=0.4), lambda y: 0.4),
        (AdvSoft(mode="relative", alpha=0.3), lambda y: 0.3 * float(weight[y].detach().norm())),
    ):
        layer = SoftmaxOutput(dim, vocab, weight, advsoft)
        with torch.no_grad():
            layer.bias.normal_()
            got = layer.nll_of(h, targets, adversarial=True)
            clean = layer.nll_of(h, targets)
        for bt in range(2):
            for t in range(5):
                y = int(targets[bt, t])
                logits = (weight @ h[bt, t] + layer.bias).double()
                logits[y] -= eps_of(y) * float(h[bt, t].norm())
                expected = -torch.log_softmax(logits, 0)[y]
                assert float(got[bt, t].detach()) == pytest.approx(float(expected.detach()), rel=1e-5)
        assert torch.all(got > clean), "the adversary can only lower the target's probability"


@pytest.mark.parametrize("seed", range(5))
def test_theorem_3_4_bound_holds_on_random_instances(seed: int) -> None:
    """AdvSoft_eps(i; w, h) <= sigmoid(Phi(i, w, ||h||)) <= sigmoid(||h|| min_j (||w_i - w_j|| - eps)).

    The extracted paper text lost the inequality sign; this direction is the one its proof's
    Cauchy-Schwarz step gives ((w_j - w_i).h >= -||w_j - w_i|| ||h||), and the one under which
    "maximizing AdvSoft also maximizes the energy Phi" holds.
    """
    g = torch.Generator().manual_seed(100 + seed)
    for _ in range(200):
        vocab, dim = int(torch.randint(2, 30, (1,), generator=g)), int(torch.randint(1, 10, (1,), generator=g))
        w = torch.randn(vocab, dim, generator=g, dtype=torch.float64) * float(torch.rand(1, generator=g) * 3)
        h = torch.randn(dim, generator=g, dtype=torch.float64) * float(torch.rand(1, generator=g) * 5)
        i, eps = int(torch.randint(0, vocab, (1,), generator=g)), float(torch.rand(1, generator=g))
        adv = torch.exp(_closed_form_log_prob(w, h, torch.zeros(vocab, dtype=torch.float64), i, eps))
        dist = (w[i] - w).norm(dim=1)[torch.arange(vocab) != i]
        phi = -torch.logsumexp(-h.norm() * (dist - eps), 0)
        assert float(adv) <= float(torch.sigmoid(phi)) + 1e-12
        assert float(phi) <= float(h.norm() * (dist - eps).min()) + 1e-12


def _reference_loss(weight, bias, h, targets, margin_fn):
    """Cross-entropy on logits with the margin added through a one-hot mask (no in-place ops)."""
    logits = h @ weight.t() + bias
    onehot = F.one_hot(targets, weight.size(0)).to(logits.dtype)
    return F.cross_entropy(logits - onehot * margin_fn(h, weight[targets]).unsqueeze(1), targets)


def _grads(layer: SoftmaxOutput, h: torch.Tensor, targets: torch.Tensor) -> list[torch.Tensor]:
    h = h.clone().requires_grad_(True)
    loss = layer.nll_of(h, targets, adversarial=True).mean()
    return torch.autograd.grad(loss, [h, layer.weight, layer.bias])


def _ref_grads(layer: SoftmaxOutput, h: torch.Tensor, targets: torch.Tensor, margin_fn) -> list[torch.Tensor]:
    h = h.clone().requires_grad_(True)
    loss = _reference_loss(layer.weight, layer.bias, h, targets, margin_fn)
    return torch.autograd.grad(loss, [h, layer.weight, layer.bias])


def _layer(advsoft: AdvSoft, vocab: int = 13, dim: int = 4) -> SoftmaxOutput:
    torch.manual_seed(1)
    layer = SoftmaxOutput(dim, vocab, advsoft=advsoft).double()
    with torch.no_grad():
        layer.weight.normal_()
        layer.bias.normal_()
    return layer


def test_default_gradients_treat_the_margin_as_a_constant() -> None:
    alpha = 0.4
    layer = _layer(AdvSoft(mode="relative", alpha=alpha))
    h, targets = torch.randn(20, 4, dtype=torch.float64), torch.randint(0, 13, (20,))
    got = _grads(layer, h, targets)
    expected = _ref_grads(layer, h, targets, lambda hh, wy: (alpha * wy.norm(dim=1) * hh.norm(dim=1)).detach())
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)


def test_ablation_lets_gradients_through_the_norm_term() -> None:
    alpha = 0.4
    layer = _layer(AdvSoft(mode="relative", alpha=alpha, grad="full"))
    h, targets = torch.randn(20, 4, dtype=torch.float64), torch.randint(0, 13, (20,))
    got = _grads(layer, h, targets)
    expected = _ref_grads(layer, h, targets, lambda hh, wy: alpha * wy.norm(dim=1) * hh.norm(dim=1))
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)
    constant = _ref_grads(layer, h, targets, lambda hh, wy: (alpha * wy.norm(dim=1) * hh.norm(dim=1)).detach())
    assert not torch.allclose(got[0], constant[0]), "the ablation must change the gradient w.r.t. h"
    assert not torch.allclose(got[1], constant[1]), "and w.r.t. the target embeddings"


def test_hidden_mode_equals_the_fixed_delta_vector_of_algorithm_1() -> None:
    """grad="hidden": differentiate (w_y + delta) . h with delta = -eps h/||h|| held fixed."""
    alpha = 0.4
    layer = _layer(AdvSoft(mode="relative", alpha=alpha, grad="hidden"))
    h, targets = torch.randn(20, 4, dtype=torch.float64), torch.randint(0, 13, (20,))

    def fixed_delta(hh, wy):
        delta = (-alpha * wy.norm(dim=1, keepdim=True) * hh / hh.norm(dim=1, keepdim=True)).detach()
        return -(delta * hh).sum(1)

    for a, b in zip(_grads(layer, h, targets), _ref_grads(layer, h, targets, fixed_delta)):
        torch.testing.assert_close(a, b)


def test_positive_only_perturbs_only_tokens_aligned_with_their_target() -> None:
    layer = _layer(AdvSoft(mode="fixed", epsilon=0.5, positive_only=True))
    h, targets = torch.randn(40, 4, dtype=torch.float64), torch.randint(0, 13, (40,))
    with torch.no_grad():
        got = layer.nll_of(h, targets, adversarial=True)
        clean = layer.nll_of(h, targets)
        aligned = (layer.weight[targets] * h).sum(1) > 0
    assert aligned.any() and (~aligned).any()
    assert torch.all(got[aligned] > clean[aligned])
    torch.testing.assert_close(got[~aligned], clean[~aligned])


def test_evaluation_is_clean_whatever_the_option() -> None:
    torch.manual_seed(0)
    plain = LanguageModel(ModelConfig.build(emb_size=8, hidden_size=12, num_layers=2), 30)
    adv = LanguageModel(
        ModelConfig.build(emb_size=8, hidden_size=12, num_layers=2, advsoft="relative", advsoft_alpha=1.0), 30
    )
    adv.load_state_dict(plain.state_dict())
    plain.eval(), adv.eval()
    ids = torch.randint(0, 30, (3, 9))
    with torch.no_grad():
        torch.testing.assert_close(adv.log_probs(ids)[0], plain.log_probs(ids)[0], rtol=0, atol=0)
        torch.testing.assert_close(adv.nll(ids, ids)[0], plain.nll(ids, ids)[0], rtol=0, atol=0)
    stream = torch.randint(0, 30, (200,))
    assert evaluate(adv, stream, 2, 10, "cpu").loss == evaluate(plain, stream, 2, 10, "cpu").loss


def test_adversarial_needs_an_advsoft_layer() -> None:
    with pytest.raises(ValueError, match="advsoft"):
        SoftmaxOutput(4, 5).nll_of(torch.randn(1, 2, 4), torch.zeros(1, 2, dtype=torch.long), adversarial=True)


def test_input_noise_only_in_training() -> None:
    torch.manual_seed(0)
    model = LanguageModel(
        ModelConfig.build(
            emb_size=8, hidden_size=12, num_layers=1, input_dropout=0, hidden_dropout=0, output_dropout=0
        ),
        20,
    )
    ids = torch.randint(0, 20, (2, 6))
    model.eval()
    torch.testing.assert_close(model(ids, input_noise=0.5).output, model(ids).output, rtol=0, atol=0)
    model.train()
    torch.testing.assert_close(model(ids, input_noise=0.0).output, model(ids).output, rtol=0, atol=0)
    torch.manual_seed(3)
    noisy = model.embedding(ids, 0.5)
    torch.manual_seed(3)
    expected = model.embedding(ids) + 0.5 * torch.randn(2, 6, 8)
    torch.testing.assert_close(noisy, expected)


@pytest.mark.parametrize(
    ("schedule", "epoch", "expected"),
    [
        ("constant", 7, 0.2),
        ("linear", 0, 0.2),
        ("linear", 5, 0.1),
        ("linear", 10, 0.0),
        ("linear", 30, 0.0),
        ("exponential", 10, 0.1),
        ("exponential", 20, 0.05),
    ],
)
def test_noise_schedules(schedule: str, epoch: int, expected: float) -> None:
    assert annealed_std(0.2, schedule, epoch, 10) == pytest.approx(expected)


def test_training_switches_advsoft_off_by_epoch_and_stage(tmp_path: Path) -> None:
    config = build_config(
        "advsoft-tiny", ["train.advsoft_stop_epoch=2", "train.advsoft_finetune=false", "data.synthetic_sentences=200"]
    )
    train(config, tmp_path / "run", progress=False)
    epochs = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["event"] == "epoch"]
    main_stage = [r for r in epochs if r["stage"] == "main"]
    assert [r["advsoft"] for r in main_stage] == [True, True, False]
    assert [r["input_noise"] for r in main_stage] == pytest.approx([0.1, 0.1 * 2 / 3, 0.1 / 3])
    finetune = [r for r in epochs if r["stage"] == "finetune"]
    assert finetune and not any(r["advsoft"] for r in finetune) and all(r["input_noise"] == 0 for r in finetune)
    assert all(math.isfinite(r["valid_loss"]) for r in epochs)


def _train_output_layer(adversarial: bool, eps: float = 0.5, steps: int = 300) -> torch.Tensor:
    """Train only the output embedding of a softmax on fixed contexts (word i follows context i)."""
    torch.manual_seed(0)
    vocab, dim = 30, 8
    layer = SoftmaxOutput(dim, vocab, advsoft=AdvSoft(mode="fixed", epsilon=eps))
    with torch.no_grad():
        layer.weight.mul_(0.1)
    contexts = F.normalize(torch.randn(1, vocab, dim), dim=-1) * 3
    targets = torch.arange(vocab).unsqueeze(0)
    optimizer = torch.optim.SGD(layer.parameters(), lr=1.0)
    for _ in range(steps):
        loss = layer.nll_of(contexts, targets, adversarial=adversarial).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return layer.weight.detach().double(), contexts[0].double()


def _nearest(w: torch.Tensor) -> torch.Tensor:
    d = torch.cdist(w, w)
    d.fill_diagonal_(math.inf)
    return d.min(dim=1).values


def test_advsoft_spreads_the_output_embedding_apart() -> None:
    """Section 3.2's mechanism: the same training with AdvSoft ends with the words farther apart."""
    plain, _ = _train_output_layer(adversarial=False)
    adv, _ = _train_output_layer(adversarial=True)
    assert float(_nearest(adv).mean()) > 1.15 * float(_nearest(plain).mean())
    assert float(_nearest(adv).min()) > float(_nearest(plain).min())


def _recognizability(w: torch.Tensor, contexts: torch.Tensor) -> torch.Tensor:
    """Per word i, the largest eps at which w_i dominates under eps-perturbation for context i
    (Definition 3.2): ``(w_i.h_i - max_{j != i} w_j.h_i) / ||h_i||`` (negative: not recognizable)."""
    logits = contexts @ w.t()
    others = logits.masked_fill(torch.eye(len(w), dtype=torch.bool), -math.inf).max(dim=1).values
    return (logits.diagonal() - others) / contexts.norm(dim=1)


def test_theorem_3_3_recognizable_words_are_separated() -> None:
    """A word that dominates under eps-adversarial perturbation for some h is farther than eps
    from every other word: on trained embeddings and on random ones."""
    plain, _ = _train_output_layer(adversarial=False)
    adv, contexts = _train_output_layer(adversarial=True)
    g = torch.Generator().manual_seed(5)
    cases = [(plain, contexts), (adv, contexts)]
    cases += [
        (torch.randn(40, 3, generator=g, dtype=torch.float64), torch.randn(40, 3, generator=g, dtype=torch.float64))
        for _ in range(20)
    ]
    checked = 0
    for w, h in cases:
        eps = _recognizability(w, h)
        recognized = eps > 0
        assert torch.all(_nearest(w)[recognized] > eps[recognized])
        checked += int(recognized.sum())
    assert checked > 60
    assert float(_recognizability(adv, contexts).mean()) > float(_recognizability(plain, contexts).mean())


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("model.advsoft_alpha=-0.1", "model.output.advsoft.alpha"),
        ("model.output.advsoft.alpha=.nan", "model.output.advsoft.alpha"),
        ("model.advsoft_epsilon=.inf", "model.output.advsoft.epsilon"),
        ("model.output.advsoft.epsilon=-1", "model.output.advsoft.epsilon"),
        ("model.advsoft=sometimes", "model.output.advsoft.kind"),
        ("model.advsoft_grad=none", "model.output.advsoft.grad"),
        ("train.input_noise_std=-0.1", "train.input_noise.std"),
        ("train.input_noise_anneal=cosine", "train.input_noise.anneal"),
        ("train.advsoft_stop_epoch=-1", "train.advsoft_stop_epoch"),
    ],
)
def test_bad_advsoft_options_exit_2(tmp_path: Path, override: str, named: str, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    assert main(["train", "--preset", "advsoft-tiny", "--out", str(out), override]) == 2
    err = capsys.readouterr().err
    assert err.startswith("reglm: error:") and named in err and "Traceback" not in err
    assert not out.exists()


def test_output_layer_without_advsoft_support_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(SoftmaxOutput, "capabilities", frozenset({"logits", "softmax-logits"}))
    with pytest.raises(ReglmError, match="model.output.advsoft"):
        LanguageModel(ModelConfig.build(emb_size=4, hidden_size=4, num_layers=1, advsoft="fixed"), 10)
