"""The QRNN encoder (Bradbury et al. 2017) with the AWD regularizers: the fo-pooling scan against
the reference loop (values and gradients, carried state, both directions), the layer against a
hand-written computation, DropConnect and zoneout, the state protocol, the config checks, dynamic
evaluation and the cache on a QRNN, a bit-exact resume through the CLI, and the presets."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.testing import assert_close

from reglm.cli import main
from reglm.config import ModelConfig, build_config
from reglm.encoders import ENCODERS
from reglm.encoders import qrnn as qrnn_module
from reglm.encoders.base import StackState, concat_states
from reglm.encoders.qrnn import QRNNConfig, QRNNEncoder, QRNNLayer, affine_scan, fo_pool, fo_pool_reference
from reglm.errors import ReglmError
from reglm.evaluate.cache import CacheSpec, cache_evaluate
from reglm.evaluate.dynamic import DynamicSpec, dynamic_evaluate
from reglm.evaluate.perplexity import evaluate
from reglm.models import LanguageModel
from reglm.optim.schedules import DecaySchedule
from reglm.train.checkpoint import load_state
from reglm.train.run import StopRequest, TrainingInterrupted, train

F64 = {"dtype": torch.float64}
EXACT64 = {"rtol": 1e-12, "atol": 1e-12}
F32 = {"rtol": 1e-5, "atol": 1e-6}


def _gates(batch: int, steps: int, hidden: int, **kw) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    f = torch.sigmoid(3 * torch.randn(batch, steps, hidden, **kw)).requires_grad_()
    z = torch.tanh(torch.randn(batch, steps, hidden, **kw)).requires_grad_()
    c0 = torch.randn(batch, hidden, **kw).requires_grad_()
    return f, z, c0


def _grads(out: torch.Tensor, inputs: tuple[torch.Tensor, ...], weights: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return torch.autograd.grad((out * weights).sum(), inputs)


# ---------------------------------------------------------------- the scan against the loop


@pytest.mark.parametrize("steps", [1, 2, 5, 8, 13, 70])
def test_scan_equals_the_reference_loop_values_and_gradients(steps: int) -> None:
    f, z, c0 = _gates(3, steps, 4, **F64)
    fast, slow = fo_pool(f, z, c0), fo_pool_reference(f, z, c0)
    assert_close(fast, slow, **EXACT64)
    weights = torch.randn_like(fast)
    for got, want in zip(_grads(fast, (f, z, c0), weights), _grads(slow, (f, z, c0), weights)):
        assert_close(got, want, **EXACT64)


def test_scan_gradients_pass_gradcheck() -> None:
    f, z, c0 = _gates(2, 9, 2, **F64)
    assert torch.autograd.gradcheck(fo_pool, (f, z, c0))


def test_scan_carries_state_across_two_calls() -> None:
    """Two calls, the second from the first's last c, give the one-call result and gradients."""
    f, z, c0 = _gates(2, 11, 3, **F64)
    whole = fo_pool_reference(f, z, c0)
    first = fo_pool(f[:, :6], z[:, :6], c0)
    second = fo_pool(f[:, 6:], z[:, 6:], first[:, -1])
    split = torch.cat([first, second], dim=1)
    assert_close(split, whole, **EXACT64)
    weights = torch.randn_like(whole)
    for got, want in zip(_grads(split, (f, z, c0), weights), _grads(whole, (f, z, c0), weights)):
        assert_close(got, want, **EXACT64)


@pytest.mark.parametrize("steps", [1, 6, 7])
def test_reverse_scan_runs_backwards_in_time(steps: int) -> None:
    a, b, carry = torch.rand(2, steps, 3, **F64), torch.randn(2, steps, 3, **F64), torch.randn(2, 3, **F64)
    want, h = torch.empty_like(b), carry
    for t in reversed(range(steps)):
        h = a[:, t] * h + b[:, t]
        want[:, t] = h
    assert_close(affine_scan(a, b, carry, torch.empty_like(b), reverse=True), want, **EXACT64)


def test_scan_is_exact_where_forget_gates_vanish() -> None:
    """f = 0 (a saturated sigmoid) and f = 1 are handled like the loop: no log, no division."""
    f = torch.tensor([[0.0, 1.0, 0.5, 0.0, 1e-30, 1.0]]).unsqueeze(-1)
    z = torch.tensor([[0.3, -0.2, 0.9, -0.7, 0.4, 0.1]]).unsqueeze(-1)
    c0 = torch.tensor([[5.0]])
    assert_close(fo_pool(f, z, c0), fo_pool_reference(f, z, c0), rtol=0, atol=1e-7)


def test_half_precision_gates_pool_in_float32() -> None:
    f, z, c0 = _gates(2, 33, 8)
    out = fo_pool(f.bfloat16(), z.bfloat16(), c0.detach())
    assert out.dtype == torch.float32
    assert_close(out, fo_pool_reference(f.bfloat16().float(), z.bfloat16().float(), c0), **F32)
    out.sum().backward()
    assert f.grad.dtype == torch.float32


@pytest.mark.cuda
def test_scan_on_cuda_equals_the_loop_and_trains_under_bf16_autocast() -> None:
    f, z, c0 = _gates(4, 70, 64)
    weights = torch.randn(4, 70, 64)
    on_gpu = [t.detach().cuda().requires_grad_() for t in (f, z, c0)]
    fast = fo_pool(*on_gpu)
    assert fast.device.type == "cuda" and fast.dtype == torch.float32
    slow = fo_pool_reference(f, z, c0)
    assert_close(fast.cpu(), slow, **F32)
    for got, want in zip(_grads(fast, tuple(on_gpu), weights.cuda()), _grads(slow, (f, z, c0), weights)):
        assert_close(got.cpu(), want, **F32)
    enc = QRNNEncoder(QRNNConfig(hidden_size=32, num_layers=2, weight_dropout=0.2), 16).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = enc(torch.randn(2, 9, 16, device="cuda"), enc.init_state(2, "cuda"))
    out.output.float().sum().backward()
    assert all(c.dtype == torch.float32 and c.device.type == "cuda" for c, _ in out.state.layers)
    assert all(p.grad is not None and p.grad.isfinite().all() for p in enc.parameters())


# ---------------------------------------------------------------- one layer


def _hand_qrnn(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, window: int, c: torch.Tensor, x_prev: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """QRNN-fo written out step by step from the paper's equations (independent of the module)."""
    hidden = bias.numel() // 3
    outputs = []
    for t in range(x.size(1)):
        source = x[:, t] if window == 1 else torch.cat([x[:, t], x_prev], dim=-1)
        y = source @ weight.T + bias
        z, f, o = torch.tanh(y[:, :hidden]), torch.sigmoid(y[:, hidden : 2 * hidden]), torch.sigmoid(y[:, 2 * hidden :])
        c = f * c + (1 - f) * z
        outputs.append(o * c)
        x_prev = x[:, t]
    return torch.stack(outputs, dim=1), c


@pytest.mark.parametrize("window", [1, 2])
def test_layer_equals_a_hand_written_qrnn(window: int) -> None:
    layer = QRNNLayer(5, 7, window=window).double()
    x = torch.randn(3, 9, 5, **F64)
    c0, x_prev = torch.randn(3, 7, **F64), torch.randn(3, 5 * (window - 1), **F64)
    h, (c_last, prev_last) = layer(x, (c0, x_prev))
    want_h, want_c = _hand_qrnn(x, layer.weight, layer.bias, window, c0, x_prev if window == 2 else None)
    assert_close(h, want_h, **EXACT64)
    assert_close(c_last, want_c, **EXACT64)
    assert_close(prev_last, x[:, -1] if window == 2 else x_prev, rtol=0, atol=0)


@pytest.mark.parametrize("window", [1, 2])
def test_layer_is_stateful_across_calls(window: int) -> None:
    layer = QRNNLayer(4, 6, window=window).double()
    x = torch.randn(2, 10, 4, **F64)
    whole, (c_whole, _) = layer(x)
    first, state = layer(x[:, :4])
    second, (c_split, _) = layer(x[:, 4:], state)
    assert_close(torch.cat([first, second], dim=1), whole, **EXACT64)
    assert_close(c_split, c_whole, **EXACT64)


def test_gates_are_in_range(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = {}

    def spy(f, z, c0):
        seen.update(f=f.detach(), z=z.detach())
        return fo_pool(f, z, c0)

    monkeypatch.setattr(qrnn_module, "fo_pool", spy)
    layer = QRNNLayer(6, 8, window=2)
    with torch.no_grad():
        layer.bias.fill_(3.0)  # push the gates towards saturation
    h, _ = layer(4 * torch.randn(2, 12, 6))
    assert 0.0 <= seen["f"].min() and seen["f"].max() <= 1.0
    assert -1.0 <= seen["z"].min() and seen["z"].max() <= 1.0
    assert h.abs().max() <= 1.0  # |c| <= 1 from a zero state, 0 < o < 1


def test_initialization_is_the_reference_linear_layers() -> None:
    layer = QRNNLayer(50, 40, window=2)
    bound = 1 / (2 * 50) ** 0.5
    assert layer.weight.shape == (120, 100) and layer.bias.shape == (120,)
    for param in (layer.weight, layer.bias):
        assert param.abs().max() <= bound and param.abs().max() > 0.9 * bound


# ---------------------------------------------------------------- DropConnect and zoneout


def test_dropconnect_masks_are_constant_over_time_and_off_in_eval(monkeypatch: pytest.MonkeyPatch) -> None:
    masks = []
    keep_mask = qrnn_module.keep_mask

    def recording(shape, p, like):
        masks.append(keep_mask(shape, p, like))
        return masks[-1]

    monkeypatch.setattr(qrnn_module, "keep_mask", recording)
    layer = QRNNLayer(5, 6, window=2, weight_dropout=0.5).double()
    x = torch.randn(2, 8, 5, **F64)
    zeros = layer.init_state(2)
    h, _ = layer(x, zeros)
    assert len(masks) == 1 and masks[0].shape == layer.weight.shape, "one mask per forward call, on W only"
    assert (masks[0] == 0).any() and (masks[0] == 2).any()
    want, _ = _hand_qrnn(x, layer.weight * masks[0], layer.bias, 2, *zeros)
    assert_close(h, want, **EXACT64)  # the same dropped W at every time step
    h2, _ = layer(x, zeros)
    assert len(masks) == 2 and not torch.equal(h, h2), "a new mask per call"

    layer.eval()
    plain = QRNNLayer(5, 6, window=2).double()
    plain.load_state_dict(layer.state_dict())
    assert_close(layer(x)[0], plain(x)[0], rtol=0, atol=0)
    assert len(masks) == 2, "no mask in eval mode"


def test_dropconnect_gradients_reach_the_raw_weight_through_the_mask(monkeypatch: pytest.MonkeyPatch) -> None:
    masks = []
    keep_mask = qrnn_module.keep_mask
    monkeypatch.setattr(
        qrnn_module, "keep_mask", lambda shape, p, like: masks.append(keep_mask(shape, p, like)) or masks[-1]
    )
    layer = QRNNLayer(3, 4, weight_dropout=0.5).double()
    layer(torch.randn(2, 5, 3, **F64))[0].sum().backward()
    assert (layer.weight.grad[masks[0] == 0] == 0).all()
    assert (layer.weight.grad[masks[0] != 0] != 0).any()


def test_zoneout_keeps_channels_in_training_and_is_its_expectation_in_eval(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = []
    monkeypatch.setattr(qrnn_module, "fo_pool", lambda f, z, c0: seen.append(f.detach()) or fo_pool(f, z, c0))
    layer = QRNNLayer(4, 50, zoneout=0.3)
    plain = QRNNLayer(4, 50)
    plain.load_state_dict(layer.state_dict())
    x = torch.randn(3, 20, 4)
    plain(x)
    layer(x)
    f, zoned = seen
    kept = zoned == 1.0
    assert_close(zoned[~kept], f[~kept], rtol=0, atol=0)
    assert 0.25 < kept.float().mean() < 0.35
    layer.eval()
    layer(x)
    assert_close(seen[-1], 1 - 0.7 * (1 - f), **F32)


# ---------------------------------------------------------------- the encoder and its state


def _encoder(window: int = 2, **overrides) -> QRNNEncoder:
    cfg = QRNNConfig(hidden_size=6, num_layers=3, window=window, hidden_dropout=0.0, output_dropout=0.0, **overrides)
    return QRNNEncoder(cfg, 5).double()


def test_encoder_sizes_follow_the_awd_lstm_rule() -> None:
    enc = _encoder()
    assert [(li.input_size, li.hidden_size, li.window) for li in enc.layers] == [(5, 6, 2), (6, 6, 1), (6, 5, 1)]
    assert enc.output_size == 5 and enc.layer_sizes == [6, 6, 5]
    untied = QRNNEncoder(QRNNConfig(hidden_size=6, num_layers=2, last_hidden_size=9), 5)
    assert untied.output_size == 9 == QRNNConfig(last_hidden_size=9).output_size(5)
    assert ENCODERS["qrnn"] is QRNNEncoder


def test_window_one_stack_without_dropout_equals_hand_written_layers() -> None:
    enc = _encoder(window=1).eval()
    x = torch.randn(2, 7, 5, **F64)
    out = enc(x)
    h = x
    for layer, got in zip(enc.layers, out.layer_outputs):
        h, _ = _hand_qrnn(h, layer.weight, layer.bias, 1, torch.zeros(2, layer.hidden_size, **F64), None)
        assert_close(got, h, **EXACT64)
    assert_close(out.output, h, **EXACT64)
    assert out.raw_output is out.layer_outputs[-1]


@pytest.mark.parametrize("window", [1, 2])
def test_encoder_state_carries_across_windows(window: int) -> None:
    enc = _encoder(window).eval()
    x = torch.randn(2, 12, 5, **F64)
    whole = enc(x)
    first = enc(x[:, :5])
    second = enc(x[:, 5:], first.state.detach())
    assert_close(torch.cat([first.output, second.output], dim=1), whole.output, **EXACT64)
    for (c1, x1), (c2, x2) in zip(second.state.layers, whole.state.layers):
        assert_close(c1, c2, **EXACT64)
        assert_close(x1, x2, rtol=0, atol=0)


def test_state_protocol_round_trips() -> None:
    enc = _encoder()
    state = enc(torch.randn(4, 3, 5, **F64)).state
    assert [tuple(c.shape) + tuple(x.shape) for c, x in state.layers] == [(4, 6, 4, 5), (4, 6, 4, 0), (4, 5, 4, 0)]
    assert all(c.grad_fn is not None for c, _ in state.layers) and all(
        c.grad_fn is None for c, _ in state.detach().layers
    )
    joined = concat_states([state.select(slice(0, 1)), state.select(slice(1, 4))])
    reloaded = enc.load_state(joined.state_dict())
    assert isinstance(reloaded, StackState) and reloaded.stream_dim == 0
    for (c, x), (c2, x2) in zip(state.layers, reloaded.to("cpu").layers):
        assert torch.equal(c, c2) and torch.equal(x, x2)
    assert all(c.untyped_storage().nbytes() == c.numel() * c.element_size() for c, _ in state.layers), (
        "no view of the (B, T, H) output"
    )


@pytest.mark.parametrize(
    "raw",
    [
        None,
        [[torch.zeros(2, 6), torch.zeros(2, 5)]] * 2,  # too few layers
        [
            [torch.zeros(2, 7), torch.zeros(2, 5)],
            [torch.zeros(2, 6), torch.zeros(2, 0)],
            [torch.zeros(2, 5), torch.zeros(2, 0)],
        ],
        [
            [torch.zeros(2, 6), torch.zeros(2, 6)],
            [torch.zeros(2, 6), torch.zeros(2, 0)],
            [torch.zeros(2, 5), torch.zeros(2, 0)],
        ],
        [
            [torch.zeros(2, 6), torch.zeros(3, 5)],
            [torch.zeros(2, 6), torch.zeros(2, 0)],
            [torch.zeros(2, 5), torch.zeros(2, 0)],
        ],
        [
            [torch.zeros(2, 6), torch.zeros(2, 5)],
            [torch.zeros(3, 6), torch.zeros(3, 0)],
            [torch.zeros(2, 5), torch.zeros(2, 0)],
        ],
        [
            [torch.zeros(1, 2, 6), torch.zeros(2, 5)],
            [torch.zeros(2, 6), torch.zeros(2, 0)],
            [torch.zeros(2, 5), torch.zeros(2, 0)],
        ],
        [[torch.zeros(2, 6)], [torch.zeros(2, 6), torch.zeros(2, 0)], [torch.zeros(2, 5), torch.zeros(2, 0)]],
    ],
    ids=["none", "layers", "hidden", "prev", "prev-streams", "layer-streams", "lstm-layout", "pair"],
)
def test_load_state_rejects_what_does_not_fit(raw) -> None:
    with pytest.raises(ValueError):
        _encoder().load_state(raw)


@pytest.mark.parametrize(
    "override, option",
    [
        ("window=3", "model.encoder.window"),
        ("window=0", "model.encoder.window"),
        ("hidden_size=0", "model.encoder.hidden_size"),
        ("num_layers=0", "model.encoder.num_layers"),
        ("zoneout=1.0", "model.encoder.zoneout"),
        ("weight_dropout=-0.1", "model.encoder.weight_dropout"),
    ],
)
def test_bad_config_names_the_option(override: str, option: str) -> None:
    with pytest.raises(ReglmError, match=rf"invalid option {option}:"):
        build_config("qrnn-tiny", [f"model.encoder.{override}"])


def test_switching_the_kind_keeps_the_shared_options() -> None:
    encoder = build_config("tiny", ["model.encoder=qrnn"]).model.encoder
    assert isinstance(encoder, QRNNConfig) and (encoder.hidden_size, encoder.weight_dropout, encoder.window) == (
        24,
        0.3,
        2,
    )


# ---------------------------------------------------------------- evaluation-time methods on a QRNN


VOCAB = 30
QRNN = dict(encoder="qrnn", emb_size=8, hidden_size=12, num_layers=2, tie_weights=True)
DROPOUTS = dict(input_dropout=0.5, hidden_dropout=0.5, output_dropout=0.5, embed_dropout=0.5, weight_dropout=0.5)


def _lm(**overrides) -> LanguageModel:
    return LanguageModel(ModelConfig.build(**{**QRNN, **overrides}), VOCAB)


def test_dynamic_evaluation_adapts_a_qrnn_with_every_dropout_off() -> None:
    model, plain = _lm(**DROPOUTS), _lm(**{k: 0.0 for k in DROPOUTS})
    plain.load_state_dict(model.state_dict())
    ids = torch.randint(0, VOCAB, (7,)).repeat(12)
    spec = DynamicSpec(lr=0.5, lam=0.0, segment=5, variant="sgd")
    adapted = dynamic_evaluate(model.train(), ids, spec, keep_token_nll=True)
    reference = dynamic_evaluate(plain, ids, spec, keep_token_nll=True)
    assert_close(adapted.token_nll, reference.token_nll, rtol=1e-6, atol=1e-6)
    assert adapted.loss < evaluate(plain, ids, 1, 5).loss - 0.1
    still = dynamic_evaluate(model, ids, DynamicSpec(lr=0.0, lam=0.0, segment=7, variant="sgd"))
    assert_close(still.loss, evaluate(model, ids, 1, 7).loss, rtol=1e-6, atol=0.0)


def test_cache_at_lambda_zero_is_plain_evaluation() -> None:
    model = _lm().eval()
    ids = torch.randint(0, VOCAB, (90,))
    cached = cache_evaluate(model, ids, CacheSpec(20, 1.0, 0.0), batch_size=2, bptt=9)
    assert cached.loss == evaluate(model, ids, 2, 9).loss


# ---------------------------------------------------------------- the CLI: resume, presets


RUN = [
    "data.synthetic_sentences=200",
    "train.epochs=1",
    "train.finetune=false",
    "train.checkpoint_interval=4",
    "train.log_interval=5",
]


def test_a_cli_run_resumes_bit_exactly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A run stopped mid-epoch (checkpoint with the carried c and x_prev) and resumed by
    ``reglm train --resume`` ends with the uninterrupted run's weights and metrics."""
    reference, run = tmp_path / "reference", tmp_path / "run"
    assert main(["train", "--preset", "qrnn-tiny", "--out", str(reference), *RUN]) == 0
    stop = StopRequest()

    def stop_at_step_6(trainer) -> None:
        if trainer.step == 6:
            stop.request(signal.SIGINT)

    with pytest.raises(TrainingInterrupted):
        train(build_config("qrnn-tiny", RUN), run, progress=False, stop=stop, step_hooks=[stop_at_step_6])
    saved = load_state(run / "state.pt")
    assert saved["step"] == 6 and saved["stage"] == "main"
    assert main(["train", "--resume", str(run)]) == 0
    capsys.readouterr()
    for sub in ("best", "last"):
        want, got = (
            load_file(str(reference / sub / "model.safetensors")),
            load_file(str(run / sub / "model.safetensors")),
        )
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want), sub
    epochs = [
        [
            r["valid_loss"]
            for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())
            if r["event"] == "epoch"
        ]
        for d in (reference, run)
    ]
    assert epochs[0] == epochs[1] and len(epochs[0]) == 1


PRESETS = {
    "qrnn-ptb": 24_020_150,
    "qrnn-advsoft-ptb": 24_020_150,
    "qrnn-wt2": 33_354_628,
    "qrnn-advsoft-wt2": 33_354_628,
    "qrnn-wt103": 154_098_900,
    "qrnn-advsoft-wt103": 154_098_900,
}
"""Parameter counts at the published vocabularies (10,000 / 33,278 / 267,735 words)."""


def test_the_presets_build_on_the_meta_device(capsys: pytest.CaptureFixture[str]) -> None:
    for preset, total in PRESETS.items():
        assert main(["params", "--preset", preset, "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["total"] == total, preset


def test_the_ptb_preset_is_the_reference_architecture() -> None:
    """4 layers, 1550 units, the first of window 2, the last of 400 (tied); the reference's own
    modules count 24,020,150 parameters: nn.Linear(800, 4650), 2 x nn.Linear(1550, 4650),
    nn.Linear(1550, 1200), the 10,000 x 400 embedding and the decoder bias."""
    linear = lambda i, o: i * o + o  # noqa: E731
    assert (
        linear(800, 4650) + 2 * linear(1550, 4650) + linear(1550, 1200) + 10_000 * 400 + 10_000 == PRESETS["qrnn-ptb"]
    )
    config = build_config("qrnn-ptb")
    assert (config.seed, config.train.batching.batch_size, config.train.clip, config.train.finetune.epochs) == (
        9001,
        20,
        0.2,
        300,
    )
    enc = config.model.encoder
    assert (enc.hidden_size, enc.num_layers, enc.window, enc.weight_dropout, enc.hidden_dropout) == (
        1550,
        4,
        2,
        0.1,
        0.3,
    )


def test_the_wt103_preset_divides_the_rate_by_ten_after_epoch_12() -> None:
    config = build_config("qrnn-wt103")
    schedule = DecaySchedule(config.train.schedule, config.train.optimizer.lr, None)
    rates = [schedule.rate("main", epoch, 0) for epoch in range(config.train.epochs)]
    assert rates == [1e-3] * 12 + [pytest.approx(1e-4)] * 2
    assert config.model.output.cutoff_values == (2800, 20000, 76000) and config.train.averaging.kind == "none"
    adv = build_config("qrnn-advsoft-wt103")
    assert adv.model.output.advsoft.kind == "relative" and adv.train.input_noise.std == 0.15
