"""Dynamic evaluation (Krause et al. 2018): equivalence with plain evaluation at lr = 0,
hand-computed RMS and SGD updates, dropout off while adapting, adaptation on repeated text,
isolation of the caller's model, the grid search and the ``--dynamic`` / ``--dynamic-search``
parsers."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.testing import assert_close

from reglm.config import ModelConfig
from reglm.data.windows import Window
from reglm.encoders.awd_lstm import WeightDropLSTM
from reglm.errors import ReglmError
from reglm.evaluate.dynamic import DynamicEvaluator, dynamic_evaluate, dynamic_search, gradient_statistics
from reglm.evaluate.dynamic_spec import (
    DynamicGrid,
    DynamicSpec,
    check_training_data,
    parse_dynamic_grid,
    parse_dynamic_spec,
)
from reglm.evaluate.perplexity import evaluate
from reglm.models import LanguageModel

VOCAB = 40
DROPOUTS = dict(input_dropout=0.5, hidden_dropout=0.5, output_dropout=0.5, embed_dropout=0.5, weight_dropout=0.5)
NO_DROPOUT = {key: 0.0 for key in DROPOUTS}


def tiny_model(**overrides) -> LanguageModel:
    cfg = ModelConfig.build(
        **{**dict(emb_size=12, hidden_size=20, num_layers=2, tie_weights=True), **DROPOUTS, **overrides}
    )
    return LanguageModel(cfg, VOCAB)


@pytest.fixture
def model() -> LanguageModel:
    return tiny_model()


@pytest.fixture
def train_ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (3000,))


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (211,))


def stats_of(model: LanguageModel, train_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    return gradient_statistics(model, train_ids, DynamicSpec(stats_batch_size=8))


def manual_grads(model: LanguageModel, x: torch.Tensor, y: torch.Tensor, state):
    """Gradient of the mean NLL with plain ``backward`` on an eval-mode, dropout-free model."""
    model.zero_grad(set_to_none=True)
    out = model(x, state)
    nll = model.output.nll(out, y)
    nll.mean().backward()
    return nll.detach(), [p.grad.clone() for p in model.parameters()], out.state.detach()


# ---------------------------------------------------------------- lr = 0, lambda = 0 is plain evaluation


@pytest.mark.parametrize("variant", ["rms", "sgd"])
def test_lr0_lambda0_equals_evaluate_window_for_window(model, train_ids, ids, variant):
    spec = DynamicSpec(lr=0.0, lam=0.0, segment=7, batch_size=3, variant=variant, stats_batch_size=8)
    stats = stats_of(model, train_ids) if variant == "rms" else None
    dyn = dynamic_evaluate(model, ids, spec, stats, keep_token_nll=True)
    ref = evaluate(model, ids, batch_size=3, bptt=7, keep_token_nll=True)
    assert dyn.tokens == ref.tokens == 210
    assert_close(dyn.loss, ref.loss, rtol=1e-6, atol=0.0)
    assert_close(dyn.token_nll, ref.token_nll, rtol=1e-6, atol=1e-6)
    assert torch.equal(dyn.positions, ref.positions)


@pytest.mark.parametrize("segment", [1, 3, 11, 100])
def test_lr0_total_independent_of_segment_length(model, train_ids, ids, segment):
    stats = stats_of(model, train_ids)
    dyn = dynamic_evaluate(
        model, ids, DynamicSpec(lr=0.0, lam=0.0, segment=segment, batch_size=2), stats, keep_token_nll=True
    )
    ref = evaluate(model, ids, batch_size=2, bptt=7, keep_token_nll=True)
    assert dyn.tokens == ref.tokens
    assert_close(dyn.loss, ref.loss, rtol=1e-6, atol=0.0)
    assert_close(dyn.token_nll, ref.token_nll, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- statistics and update rules by hand


def test_gradient_statistics_are_the_rms_of_window_gradients(model, train_ids):
    batch, window = 4, 3
    spec = DynamicSpec(stats_batch_size=batch, max_train_tokens=2 * batch * window + 5)
    stats = gradient_statistics(model, train_ids, spec, bptt=window)
    ref = tiny_model(**NO_DROPOUT)
    ref.load_state_dict(model.state_dict())
    ref.eval()
    data = train_ids[: len(train_ids) // batch * batch].view(batch, -1)
    state, squares = None, [torch.zeros_like(p) for p in ref.parameters()]
    for start in (0, window):
        x, y = data[:, start : start + window], data[:, start + 1 : start + 1 + window]
        _, grads, state = manual_grads(ref, x, y, state)
        squares = [s + g * g for s, g in zip(squares, grads)]
    names = [name for name, _ in ref.named_parameters()]
    assert list(stats) == names and "output.weight" not in stats
    for name, s in zip(names, squares):
        assert_close(stats[name], (s / 2).sqrt(), rtol=1e-5, atol=1e-10)


@pytest.mark.parametrize("length", [14, 15, 16])
def test_gradient_statistics_read_the_reference_windows(model, length, monkeypatch):
    """The reference's ``while i < L - 1 - 1`` with stride 4: a stream of 14 tokens gives windows at
    0, 4, 8 (not a 1-target window at 12); 15 and 16 tokens also read 12."""
    import reglm.evaluate.dynamic as dynamic

    seen, original = [], dynamic._segment_grads

    def spy(work, params, window, state, **kwargs):
        seen.append(window.inputs.size(1))
        return original(work, params, window, state, **kwargs)

    monkeypatch.setattr(dynamic, "_segment_grads", spy)
    gradient_statistics(model, torch.randint(0, VOCAB, (length,)), DynamicSpec(stats_batch_size=1), bptt=4)
    assert seen == {14: [4, 4, 4], 15: [4, 4, 4, 2], 16: [4, 4, 4, 3]}[length]


def two_segments(model, ids, segment):
    """The dropout-free reference copy and the two (x, y) segments of a single stream."""
    ref = tiny_model(**NO_DROPOUT)
    ref.load_state_dict(model.state_dict())
    ref.eval()
    x, y = ids[None, :-1], ids[None, 1:]
    return ref, [(x[:, :segment], y[:, :segment]), (x[:, segment:], y[:, segment:])]


@pytest.mark.parametrize("variant", ["rms", "sgd"])
def test_two_updates_match_the_formula(model, train_ids, variant):
    segment = 4
    ids = torch.randint(0, VOCAB, (2 * segment + 1,))
    stats = stats_of(model, train_ids)
    spec = DynamicSpec(lr=3e-3 if variant == "rms" else 0.5, lam=0.3, eps=1e-4, segment=segment, variant=variant)
    ref, segments = two_segments(model, ids, segment)
    theta0 = [p.detach().clone() for p in ref.parameters()]
    rms = [stats[name] for name, _ in ref.named_parameters()]
    mean = sum(r.mean() for r in rms) / len(rms)
    if variant == "rms":
        decay = [torch.clamp(spec.lam * r / mean, max=1.0) for r in rms]
        assert any(bool((spec.lam * r / mean > 1).any()) for r in rms), "the test should exercise the clipping"
    state, expected_nll = None, []
    for x, y in segments:
        nll, grads, state = manual_grads(ref, x, y, state)
        expected_nll.append(nll)
        with torch.no_grad():
            for i, (p, p0, g) in enumerate(zip(ref.parameters(), theta0, grads)):
                if variant == "rms":
                    p.copy_(p - spec.lr * g / (rms[i] + spec.eps) + decay[i] * (p0 - p))
                else:
                    p.copy_(p - spec.lr * g + spec.lam * (p0 - p))

    evaluator = DynamicEvaluator(model, stats if variant == "rms" else None)
    state = None
    for (x, y), nll_ref in zip(segments, expected_nll):
        window = Window(x, y, None, torch.zeros_like(y), y.numel(), y.numel())
        nll, state = evaluator.adapt(window, state, spec)
        assert_close(nll, nll_ref, rtol=1e-6, atol=1e-6)
    for (name, p), p_ref in zip(evaluator.model.named_parameters(), ref.parameters()):
        assert_close(p.detach(), p_ref.detach(), rtol=1e-5, atol=1e-7, msg=name)
    assert any(not torch.equal(p, p0) for p, p0 in zip(ref.parameters(), theta0))

    result = dynamic_evaluate(model, ids, spec, stats if variant == "rms" else None, keep_token_nll=True)
    assert_close(result.token_nll, torch.cat(expected_nll, dim=1)[0], rtol=1e-6, atol=1e-6)
    static = evaluate(model, ids, 1, segment, keep_token_nll=True).token_nll
    assert_close(result.token_nll[:segment], static[:segment])
    assert not torch.allclose(result.token_nll[segment:], static[segment:])


@pytest.mark.parametrize("tied", [True, False])
def test_float64_updates_match_autograd_through_torch_lstm(train_ids, tied):
    """The working copy's gradients (segment kernel, sparse lookup gradients) against plain
    autograd through ``torch.lstm`` on a dropout-free float64 copy, three segments: equal to
    float64 rounding (1e-12 is about 10^4 ulps of the weights' magnitude)."""
    model = tiny_model(tie_weights=tied).double()
    ids = torch.randint(0, VOCAB, (3 * 4 + 1,))
    stats = stats_of(model, train_ids)
    spec = DynamicSpec(lr=3e-3, lam=0.3, eps=1e-4, segment=4)
    ref = tiny_model(tie_weights=tied, **NO_DROPOUT).double()
    ref.load_state_dict(model.state_dict())
    ref.eval()
    theta0 = [p.detach().clone() for p in ref.parameters()]
    rms = [stats[name] for name, _ in ref.named_parameters()]
    mean = sum(r.mean() for r in rms) / len(rms)
    evaluator = DynamicEvaluator(model, stats)
    assert evaluator.model.embedding.sparse_gradient
    state, ref_state = None, None
    for k in range(3):
        x, y = ids[None, 4 * k : 4 * k + 4], ids[None, 4 * k + 1 : 4 * k + 5]
        nll_ref, grads, ref_state = manual_grads(ref, x, y, ref_state)
        with torch.no_grad():
            for p, p0, g, r in zip(ref.parameters(), theta0, grads, rms):
                p.copy_(p - spec.lr * g / (r + spec.eps) + torch.clamp(spec.lam * r / mean, max=1.0) * (p0 - p))
        nll, state = evaluator.adapt(Window(x, y, None, torch.zeros_like(y), y.numel(), y.numel()), state, spec)
        assert_close(nll, nll_ref, rtol=1e-12, atol=1e-12)
    for (name, p), p_ref in zip(evaluator.model.named_parameters(), ref.parameters()):
        assert_close(p.detach(), p_ref.detach(), rtol=1e-12, atol=1e-12, msg=name)


def test_adapt_output_updates_only_the_output_layer_by_its_own_gradient(train_ids):
    """``adapt=output``: the gradient of the output layer alone (the encoder, input lookup
    included, held fixed) and the rule with mean(R) over the adapted tensors, float64."""
    model = tiny_model().double()
    ids = torch.randint(0, VOCAB, (3 * 4 + 1,))
    spec = DynamicSpec(lr=3e-3, lam=0.3, eps=1e-4, segment=4, adapt="output", stats_batch_size=8)
    stats = gradient_statistics(model, train_ids, spec)
    ref = tiny_model(**NO_DROPOUT).double()
    ref.load_state_dict(model.state_dict())
    ref.eval()
    adapted = [(n, p) for n, p in ref.named_parameters() if any(p is q for q in ref.output.parameters())]
    assert set(stats) == {n for n, _ in adapted} == {"embedding.weight", "output.bias"}
    theta0 = {n: p.detach().clone() for n, p in ref.named_parameters()}
    mean = sum(stats[n].mean() for n, _ in adapted) / len(adapted)
    evaluator = DynamicEvaluator(model, stats, adapt="output")
    state, ref_state = None, None
    for k in range(3):
        x, y = ids[None, 4 * k : 4 * k + 4], ids[None, 4 * k + 1 : 4 * k + 5]
        with torch.no_grad():
            out = ref(x, ref_state)
        nll_ref = ref.output.nll(out, y)
        grads = torch.autograd.grad(nll_ref.mean(), [p for _, p in adapted])
        ref_state = out.state
        with torch.no_grad():
            for (n, p), g in zip(adapted, grads):
                r = stats[n]
                p.copy_(p - spec.lr * g / (r + spec.eps) + torch.clamp(spec.lam * r / mean, max=1.0) * (theta0[n] - p))
        nll, state = evaluator.adapt(Window(x, y, None, torch.zeros_like(y), y.numel(), y.numel()), state, spec)
        assert_close(nll, nll_ref.detach(), rtol=1e-12, atol=1e-12)
    for (name, p), p_ref in zip(evaluator.model.named_parameters(), ref.parameters()):
        assert_close(p.detach(), p_ref.detach(), rtol=1e-12, atol=1e-12, msg=name)
        assert torch.equal(p.detach(), theta0[name]) == (name not in stats), name
    with pytest.raises(ValueError, match="adapt"):
        evaluator.adapt(Window(x, y, None, torch.zeros_like(y), y.numel(), y.numel()), None, DynamicSpec())
    assert parse_dynamic_spec("adapt=output").adapt == "output"
    with pytest.raises(ReglmError, match="adapt"):
        parse_dynamic_spec("adapt=encoder")


# ---------------------------------------------------------------- dropout, adaptation, isolation


def test_every_dropout_is_off_while_adapting(model, train_ids, ids):
    plain = tiny_model(**NO_DROPOUT)
    plain.load_state_dict(model.state_dict())
    spec = DynamicSpec(lr=1e-3, lam=0.01, segment=5, batch_size=2, stats_batch_size=8)
    stats, stats_plain = stats_of(model, train_ids), stats_of(plain, train_ids)
    for name in stats:
        assert_close(stats[name], stats_plain[name], rtol=1e-6, atol=0.0)
    runs = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        runs.append(dynamic_evaluate(model.train(), ids, spec, stats, keep_token_nll=True))
    reference = dynamic_evaluate(plain, ids, spec, stats_plain, keep_token_nll=True)
    assert runs[0].loss == runs[1].loss
    assert_close(runs[0].token_nll, reference.token_nll, rtol=1e-6, atol=1e-6)

    work = DynamicEvaluator(model, stats).model
    assert not work.training and not work.encoder.hidden_dropout.training
    lstms = [m for m in work.modules() if isinstance(m, WeightDropLSTM)]
    assert lstms and all(m.training and m.weight_dropout == 0.0 for m in lstms)


def test_mixture_of_softmaxes_output_adapts_without_latent_dropout(train_ids, ids):
    mos = dict(output="mos", n_experts=3, last_hidden_size=16, latent_dropout=0.5)
    model, plain = tiny_model(**mos), tiny_model(**{**mos, **NO_DROPOUT, "latent_dropout": 0.0})
    plain.load_state_dict(model.state_dict())
    spec = DynamicSpec(lr=1e-3, lam=0.01, batch_size=2, stats_batch_size=8)
    stats = stats_of(model, train_ids)
    adapted = dynamic_evaluate(model.train(), ids, spec, stats, keep_token_nll=True)
    reference = dynamic_evaluate(plain, ids, spec, stats_of(plain, train_ids), keep_token_nll=True)
    assert_close(adapted.token_nll, reference.token_nll, rtol=1e-6, atol=1e-6)
    still = dynamic_evaluate(model, ids, DynamicSpec(lr=0.0, lam=0.0, segment=7, batch_size=2), stats)
    assert_close(still.loss, evaluate(model, ids, 2, 7).loss, rtol=1e-6, atol=0.0)


@pytest.mark.parametrize(
    "spec",
    [DynamicSpec(lr=1e-3, lam=0.0, stats_batch_size=8), DynamicSpec(lr=1.0, lam=0.0, variant="sgd")],
    ids=["rms", "sgd"],
)
def test_adaptation_lowers_the_loss_on_a_repeated_phrase(train_ids, spec):
    model = tiny_model(**NO_DROPOUT)
    ids = torch.randint(0, VOCAB, (9,)).repeat(40)
    stats = stats_of(model, train_ids) if spec.variant == "rms" else None
    static = evaluate(model, ids, 1, spec.segment)
    dynamic = dynamic_evaluate(model, ids, spec, stats)
    assert dynamic.tokens == static.tokens
    assert dynamic.loss < static.loss - 0.5


def test_the_callers_model_is_unchanged(model, train_ids, ids):
    model.train()
    before = copy.deepcopy(model.state_dict())
    mkldnn = torch.backends.mkldnn.enabled
    spec = DynamicSpec(lr=1e-3, lam=0.01, stats_batch_size=8)
    stats = gradient_statistics(model, train_ids, spec)
    first = dynamic_evaluate(model, ids, spec, stats)
    dynamic_search(model, ids, DynamicGrid(spec, (1e-3,), (0.01,)), stats)
    second = dynamic_evaluate(model, ids, spec, stats)
    assert first.loss == second.loss
    assert model.training
    assert all(m.weight_dropout == 0.5 for m in model.modules() if isinstance(m, WeightDropLSTM))
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    assert all(p.grad is None for p in model.parameters())
    assert torch.backends.mkldnn.enabled == mkldnn


def test_search_keeps_the_best_grid_point(model, train_ids, ids):
    stats = stats_of(model, train_ids)
    spec = DynamicSpec(stats_batch_size=8)
    found = dynamic_search(model, ids, DynamicGrid(spec, (0.0, 1e-3, 3e-3), (0.0, 0.02)), stats)
    assert [(s.lr, s.lam) for s, _ in found.results] == [(lr, lam) for lam in (0.0, 0.02) for lr in (0.0, 1e-3, 3e-3)]
    losses = [r.loss for _, r in found.results]
    assert found.best_result.loss == min(losses)
    assert (found.best.lr, found.best.lam) == [(s.lr, s.lam) for s, r in found.results if r.loss == min(losses)][0]
    assert_close(found.results[0][1].loss, evaluate(model, ids, 1, 5).loss, rtol=1e-6, atol=0.0)
    for s, r in found.results:
        assert r.loss == dynamic_evaluate(model, ids, s, stats).loss
    assert set(found.as_dict()) == {"best", "results"}


def test_default_grid_is_the_reference_grid():
    grid = DynamicGrid.around(DynamicSpec())
    assert grid.lrs == pytest.approx([3e-5, 4e-5, 5e-5, 6e-5, 7e-5, 1e-4], rel=1e-12)
    assert grid.lams == pytest.approx([0.001, 0.002, 0.003, 0.005], rel=1e-12)
    assert parse_dynamic_grid("") == grid and len(grid) == 24
    assert [(s.lr, s.lam) for s in grid.specs()[:2]] == [(grid.lrs[0], 0.001), (grid.lrs[1], 0.001)]


def test_rms_needs_statistics(model, ids):
    with pytest.raises(ValueError, match="gradient statistics"):
        dynamic_evaluate(model, ids, DynamicSpec())


# ---------------------------------------------------------------- the --dynamic spec and training data


def test_parse_spec_any_order_aliases_and_defaults():
    assert (
        parse_dynamic_spec("")
        == DynamicSpec()
        == DynamicSpec(lr=5e-5, lam=0.002, eps=2e-5, segment=5, variant="rms", batch_size=1, stats_batch_size=100)
    )
    spec = parse_dynamic_spec(" variant=rms, segment=5 ,lambda=0.02,lr=2e-5,eps=1e-3,max_train_tokens=2e5 ")
    assert spec == DynamicSpec(lr=2e-5, lam=0.02, eps=1e-3, segment=5, max_train_tokens=200000)
    assert parse_dynamic_spec(
        "lam=0.1,epsilon=1e-4,max_train_tokens=all,batch_size=4,stats_batch_size=20"
    ) == DynamicSpec(lam=0.1, eps=1e-4, batch_size=4, stats_batch_size=20)
    assert parse_dynamic_spec("variant=sgd,lr=0.5").variant == "sgd"


@pytest.mark.parametrize(
    "text, named",
    [
        ("foo=1", "foo"),
        ("lr=abc", "lr"),
        ("lr=-1", "lr"),
        ("lr=nan", "lr"),
        ("lambda=-0.1", "lambda"),
        ("lambda=1.5", "lambda"),
        ("eps=0", "eps"),
        ("segment=0", "segment"),
        ("segment=2.5", "segment"),
        ("variant=adam", "variant"),
        ("lr", "lr"),
        ("lr=1e-5,lr=2e-5", "lr"),
        ("variant=sgd", "lr"),
        ("max_train_tokens=0", "max_train_tokens"),
        ("batch_size=0", "batch_size"),
        ("segment=5,", "''"),
    ],
)
def test_parse_spec_errors_name_the_option_and_key(text, named):
    with pytest.raises(ReglmError, match="^--dynamic: ") as info:
        parse_dynamic_spec(text)
    assert named in str(info.value)


def test_missing_training_data_is_a_dynamic_error(model):
    spec = DynamicSpec(stats_batch_size=8)
    for train in (None, torch.zeros(0, dtype=torch.long)):
        with pytest.raises(ReglmError, match="--dynamic.*training"):
            check_training_data(train, spec)
        with pytest.raises(ReglmError, match="--dynamic"):
            gradient_statistics(model, train, spec)
    with pytest.raises(ReglmError, match="--dynamic.*stats_batch_size"):
        check_training_data(torch.zeros(20, dtype=torch.long), spec)
    check_training_data(None, DynamicSpec(lr=0.1, variant="sgd"))
    with pytest.raises(ReglmError, match="^--dynamic: .*training"):
        gradient_statistics(model, None, DynamicSpec(lr=0.1, variant="sgd"))
    with pytest.raises(ReglmError, match="^--dynamic-search: "):
        check_training_data(None, spec, option="--dynamic-search")


def test_parse_grid_lists_and_fixed_settings():
    grid = parse_dynamic_grid("lambda=0.001,0.002,0.001; lr=1e-5,2e-5 ;segment=10;variant=rms")
    assert grid == DynamicGrid(DynamicSpec(lr=1e-5, lam=0.001, segment=10), (1e-5, 2e-5), (0.001, 0.002))
    assert parse_dynamic_grid("segment=20").spec.segment == 20
    sgd = parse_dynamic_grid("variant=sgd;lr=0.1,1")
    assert sgd.lrs == (0.1, 1.0) and sgd.lams == DynamicGrid.around(sgd.spec).lams


@pytest.mark.parametrize(
    "text, named",
    [
        ("segment=5,10", "segment"),
        ("lambda=0.1,2", "lambda"),
        ("lr=1e-5,-1", "lr"),
        ("lr=", "lr"),
        ("variant=sgd;lambda=0.1", "lr"),
        ("foo=1", "foo"),
        ("lr=x", "lr"),
        ("lr=1;lr=2", "lr"),
    ],
)
def test_parse_grid_errors_name_the_option_and_key(text, named):
    with pytest.raises(ReglmError, match="^--dynamic-search: ") as info:
        parse_dynamic_grid(text)
    assert named in str(info.value)
