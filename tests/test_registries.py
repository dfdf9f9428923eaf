"""The registry conformance suite: every registered input layer, encoder and output layer, through
what the rest of reglm relies on of a component.

Each kind is paired with the defaults of the others (the ``tiny`` preset: embedding input,
AWD-LSTM, tied softmax) and checked for: its encoder state surviving ``state.pt``'s
serialization, evaluation scoring every token exactly once whatever the batch size, export equal
to PyTorch through onnxruntime (or refused by its own ``NotExportable``), every parameter taking
a gradient in a training step unless the model declares ``skips_parameters`` (what
``DistributedDataParallel`` needs), and a run stopped mid-epoch resuming to the same weights as
an uninterrupted one. A kind registered without an entry in :data:`CONFIGS` fails the first test.
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from reglm.api import TrainedModel
from reglm.config import RunConfig, build_config
from reglm.config.fields import ComponentConfig
from reglm.config.kinds import component_class, family_configs, registry
from reglm.data.batchings import eval_reading, trained_context, training_batches
from reglm.data.vocab import Vocab
from reglm.encoders.base import Encoder, state_dict_of
from reglm.errors import ReglmError, TrainingInterrupted
from reglm.evaluate.modes import MODES, EvalContext, batch_size_for, reading_for
from reglm.evaluate.perplexity import evaluate
from reglm.export import export_model
from reglm.inputs.base import InputLayer
from reglm.layers.inference import Frozen, NotExportable
from reglm.modeldir import save_model_dir
from reglm.models import LanguageModel
from reglm.objectives.objective import make_objective
from reglm.outputs.base import OutputLayer
from reglm.train.checkpoint import _is_states, save_state
from reglm.train.run import resume, train
from reglm.train.trainer import StopRequest

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")

V = 60
RUN = [
    "data.synthetic_sentences=80",
    "train.epochs=1",
    "train.finetune=false",
    "train.max_steps=6",
    "train.checkpoint_interval=3",
    "train.log_interval=100",
    "train.batch_size=4",
    "train.bptt=8",
    "train.bptt_min=3",
]
"""A run of six optimizer steps on a tiny synthetic corpus (a vocabulary of about a thousand words)."""

TRANSFORMER = [
    "model.encoder=transformer",
    "model.encoder.d_model=16",
    "model.encoder.layers=1",
    "model.encoder.heads=2",
    "model.encoder.ffn_dim=32",
    "model.encoder.dropout=0.1",
    "train.batching=blocks",
    "train.block_size=8",
    "train.ar_alpha=0",
    "train.tar_beta=0",
    "train.averaging=none",
]
CONFIGS: dict[tuple[str, str], list[str]] = {
    ("input", "embedding"): [],
    ("input", "adaptive"): [
        "model.input=adaptive",
        "model.input.dim=16",
        "model.input.cutoffs=10,30",
        "model.input.factor=2",
        "model.output.tie_weights=false",
    ],
    ("input", "char-cnn"): [
        "model.input=char-cnn",
        "model.input.char_emb_size=4",
        "model.input.filters=1:4,2:5",
        "model.input.dim=8",
        "model.input.max_chars=6",
        "model.output.tie_weights=false",
    ],
    ("encoder", "awd-lstm"): [],
    ("encoder", "vd-lstm"): [
        "model.encoder=vd-lstm",
        "model.encoder.hidden_dropout=0.2",
        "model.output.tie_weights=false",
    ],
    ("encoder", "qrnn"): ["model.encoder=qrnn", "model.encoder.window=2", "model.encoder.zoneout=0.1"],
    ("encoder", "transformer"): TRANSFORMER,
    ("output", "softmax"): [],
    ("output", "mos"): ["model.output=mos", "model.output.n_experts=2", "model.output.latent_dropout=0.1"],
    ("output", "doc"): [
        "model.output=doc",
        "model.output.n_experts=3",
        "model.output.doc_experts=2,1",
        "model.encoder.num_layers=3",
    ],
    ("output", "adaptive"): [
        "model.output=adaptive",
        "model.output.cutoffs=10,30",
        "model.output.factor=2",
        "model.output.tail_dropout=0.1",
        "model.output.tie=none",
    ],
}
"""A tiny configuration of every registered kind (``tiny`` preset overrides)."""

MODE_SPECS: dict[str, str] = {
    "plain": "",
    "context-window": "4",
    "cache": "window=20,theta=0.3,lambda=0.1",
    "cache-search": "window=10,20;theta=0.3;lambda=0.1,0.2",
    "dynamic": "lr=1e-3,lambda=0.002,segment=5,variant=sgd",
    "dynamic-search": "lr=1e-4,1e-3;lambda=0.002;segment=5;variant=sgd",
}
"""A small setting of every registered evaluation mode (its flag's text)."""

KINDS = pytest.mark.parametrize("family, kind", list(CONFIGS), ids=[f"{f}-{k}" for f, k in CONFIGS])


def config_of(family: str, kind: str) -> RunConfig:
    return build_config("tiny", [*RUN, *CONFIGS[(family, kind)]])


def vocab() -> Vocab:
    return Vocab(["<eos>", "<unk>", *(f"w{i}" for i in range(V - 2))], [0] * V)


def model_of(family: str, kind: str) -> LanguageModel:
    """The kind's tiny model, every parameter moved off its initial value (a parameter that starts
    at zero or one, such as a bias or a scale, would hide a component that forgets it)."""
    torch.manual_seed(0)
    model = LanguageModel(config_of(family, kind).model, V, vocab())
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    return model


def ids_of(*shape: int, seed: int = 3) -> torch.Tensor:
    return torch.randint(0, V, shape, generator=torch.Generator().manual_seed(seed))


def test_every_registered_kind_is_in_the_suite() -> None:
    registered = {(family, kind) for family in ("input", "encoder", "output") for kind in registry(family)}
    assert registered == set(CONFIGS)


@KINDS
def test_state_round_trips_through_state_pt(family: str, kind: str, tmp_path: Path) -> None:
    """The state after one window, written as ``state.pt`` writes it and read back by the
    encoder's ``load_state``, continues the stream exactly as the state in memory."""
    model = model_of(family, kind).eval()
    ids = ids_of(3, 11)
    with torch.no_grad():
        first = model(ids[:, :6], model.init_state(3))
        save_state(tmp_path / "state.pt", {"hidden": state_dict_of(first.state)})
        raw = torch.load(tmp_path / "state.pt", weights_only=True)["hidden"]
        assert _is_states(raw)
        loaded = model.encoder.load_state(raw)
        assert (loaded is None) == (first.state is None)
        want = model.output.predict(model(ids[:, 6:], first.state))
        got = model.output.predict(model(ids[:, 6:], loaded))
    assert torch.equal(want, got)


@KINDS
def test_evaluation_scores_every_token_once_at_any_batch_size(family: str, kind: str) -> None:
    model = model_of(family, kind)
    ids = ids_of(47)
    for batch_size in (1, 3, 4):
        result = evaluate(model, ids, batch_size, bptt=7, keep_token_nll=True)
        assert result.tokens == len(ids) - 1, batch_size
        assert sorted(result.positions.tolist()) == list(range(1, len(ids))), batch_size
        assert torch.isfinite(result.token_nll).all()


def test_every_evaluation_mode_is_in_the_suite() -> None:
    assert set(MODE_SPECS) == set(MODES)


@pytest.mark.parametrize("name", list(MODE_SPECS))
def test_every_evaluation_mode_scores_every_token_once_at_any_batch_size(name: str) -> None:
    """Each mode on a tiny model, at its own batch size and at the sizes it is given: the split's
    N - 1 targets each scored once, finite, whatever the batching."""
    mode, model, ids = MODES[name], model_of("input", "embedding"), ids_of(47)
    setting = mode.parse(MODE_SPECS[name], f"--{name}")
    train = config_of("input", "embedding").train.batching
    for given in (None, 1, 3):
        batch_size = batch_size_for(mode, setting, train, "test", given)
        block = 12 if mode.needs_blocks else None
        run_reading = eval_reading(train, "test", vocab().eos_id)
        reading = dataclasses.replace(reading_for(mode, run_reading, train, vocab().eos_id, batch_size, block), bptt=7)
        ctx = EvalContext(model, ids, "test", batch_size, 7, reading, None, torch.device("cpu"), True, False, ids, ids)
        result = mode.run(ctx, setting).result
        assert result.tokens == len(ids) - 1, (given, batch_size)
        assert sorted(result.positions.tolist()) == list(range(1, len(ids))), (given, batch_size)
        assert torch.isfinite(result.token_nll).all()


@KINDS
def test_export_equals_pytorch_or_is_refused_by_declaration(family: str, kind: str, tmp_path: Path) -> None:
    """onnxruntime reads the exported model and follows the PyTorch model over a stream of
    chunks with the state carried (1e-4: float32 rounding of a different kernel order, as in
    tests/test_export.py), or the component itself declares that it has no inference path."""
    ort = pytest.importorskip("onnxruntime", reason="the ONNX export needs onnxruntime (pip install 'reglm[export]')")
    model = model_of(family, kind).eval()
    component = {"input": model.embedding, "encoder": model.encoder, "output": model.output}[family]
    try:
        component.export_module(Frozen())
    except NotExportable:
        with pytest.raises(ReglmError, match=f"model.{family}.kind={kind} cannot be exported"):
            export_model(TrainedModel(model, vocab(), torch.device("cpu")), tmp_path / "x", "onnx")
        return
    spec = export_model(TrainedModel(model, vocab(), torch.device("cpu")), tmp_path / "x", "onnx")
    assert spec["check"]["max_abs_log_prob_diff"] < 1e-4
    assert onnx_stream_difference(model, tmp_path / "x", ort) < 1e-4


def onnx_stream_difference(model: LanguageModel, directory: Path, ort) -> float:
    """Largest |log p| difference between the ONNX file and ``model`` over chunks of 2 streams."""
    spec = json.loads((directory / "export.json").read_text())
    session = ort.InferenceSession(str(directory / spec["file"]), providers=["CPUExecutionProvider"])
    names = [t["name"] for t in spec["interface"]["inputs"]]
    state = [
        np.zeros([2 if d == "batch" else d for d in t["shape"]], dtype=np.float32)
        for t in spec["interface"]["inputs"][1:]
    ]
    reference, worst = model.init_state(2), 0.0
    with torch.no_grad():
        for seed, length in enumerate((4, 1, 5)):
            ids = ids_of(2, length, seed=seed)
            out = model(ids, reference)
            reference = out.state
            log_probs, *state = session.run(None, {"tokens": ids.numpy(), **dict(zip(names[1:], state))})
            worst = max(worst, float((torch.as_tensor(log_probs) - model.output.predict(out)).abs().max()))
    return worst


@KINDS
def test_every_parameter_takes_a_gradient_or_the_model_declares_it_skips(family: str, kind: str) -> None:
    """Data-parallel training asks DDP to look for unused parameters only where a component
    declares ``skips_parameters``; any other model must use every parameter in a step."""
    model = model_of(family, kind).train()
    ids = ids_of(4, 9)
    loss = model.output.score(model(ids[:, :-1], model.init_state(4)), ids[:, 1:])
    (loss.nll.mean() + loss.penalty).backward()
    unused = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert model.skips_parameters or unused == []


@KINDS
def test_a_stopped_run_resumes_to_the_same_weights(family: str, kind: str, tmp_path: Path) -> None:
    """Six steps straight, and three steps + a checkpoint + ``resume``: the same weights, bit for bit."""
    config = config_of(family, kind)
    train(config, tmp_path / "straight", progress=False)
    stop = StopRequest()

    def stop_at_step_3(trainer) -> None:
        if trainer.step == 3:
            stop.request(signal.SIGINT)

    with pytest.raises(TrainingInterrupted):
        train(config, tmp_path / "resumed", progress=False, stop=stop, step_hooks=[stop_at_step_3])
    resume(tmp_path / "resumed", progress=False)
    want, got = (load_file(str(tmp_path / run / "last" / "model.safetensors")) for run in ("straight", "resumed"))
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


@KINDS
def test_every_component_derives_from_its_family_base(family: str, kind: str) -> None:
    """What ``register`` checks of a component registered from outside the package holds for the
    built-in kinds too (their registry line is a dictionary entry)."""
    component = registry(family)[kind]
    assert issubclass(component, {"input": InputLayer, "encoder": Encoder, "output": OutputLayer}[family])
    assert issubclass(component.Config, ComponentConfig)


@pytest.mark.parametrize("family", ["input", "encoder", "output", "optimizer", "averaging", "schedule"])
def test_a_config_naming_another_class_s_kind_cannot_be_built(family: str) -> None:
    """The registry picks the component by its config's kind and no config checks its own kind:
    the one check (``component_class``) accepts every registered kind's config and refuses a
    config whose kind names another class's component."""
    configs = family_configs(family)
    for kind, config in configs.items():
        assert component_class(family, config(kind=kind)) is registry(family)[kind]
    first = next(iter(configs.values()))
    other = next(kind for kind, config in configs.items() if config is not first)
    with pytest.raises(ReglmError, match=rf"{family}\.kind: {first.__name__} is the config of .*, not of '{other}'"):
        component_class(family, first(kind=other))


def test_a_model_of_a_config_naming_another_kind_is_refused() -> None:
    model = config_of("encoder", "awd-lstm").model
    wrong = dataclasses.replace(model, encoder=type(model.encoder)(kind="vd-lstm"))
    with pytest.raises(
        ReglmError, match=r"model\.encoder\.kind: AWDLSTMConfig is the config of awd-lstm, not of 'vd-lstm'"
    ):
        LanguageModel(wrong, V, vocab())


# ------------------------------------------------------------------ the trainer's families

BASE, DISC = "/runs/lm/best", "/runs/discriminator/best"
"""Model directories the objectives name (written by the test that builds the objectives)."""
PATHS = {"batching": "train.batching", "objective": "objective"}
"""Where each of the trainer's families sits in the configuration."""

TRAINER_CONFIGS: dict[tuple[str, str], list[str]] = {
    ("batching", "bptt"): [],
    ("batching", "blocks"): ["train.batching=blocks", "train.batching.block_size=6", "train.batching.eval_context=2"],
    ("batching", "sentences"): ["train.batching=sentences", "train.batching.max_tokens=24"],
    ("objective", "lm"): [],
    ("objective", "discriminator"): ["objective=discriminator", f"objective.base_model={BASE}"],
    ("objective", "reverse-kl"): [
        "objective=reverse-kl",
        f"objective.base_model={BASE}",
        f"objective.discriminator={DISC}",
    ],
}
"""A tiny configuration of every registered kind of the trainer's families (``tiny`` preset overrides)."""

TRAINER_KINDS = pytest.mark.parametrize(
    "family, kind", list(TRAINER_CONFIGS), ids=[f"{f}-{k}" for f, k in TRAINER_CONFIGS]
)


def trainer_config_of(family: str, kind: str) -> RunConfig:
    return build_config("tiny", [*RUN, *TRAINER_CONFIGS[(family, kind)]])


def test_every_registered_trainer_kind_is_in_the_suite() -> None:
    registered = {(family, kind) for family in PATHS for kind in registry(family)}
    assert registered == set(TRAINER_CONFIGS)


def _component_config(config: RunConfig, family: str) -> Any:
    node: Any = config
    for name in PATHS[family].split("."):
        node = getattr(node, name)
    return node


@TRAINER_KINDS
def test_a_trainer_kind_round_trips_through_config_json(family: str, kind: str) -> None:
    config = trainer_config_of(family, kind)
    assert _component_config(config, family).kind == kind
    assert RunConfig.from_dict(json.loads(config.to_json())) == config


@TRAINER_KINDS
def test_a_trainer_kind_refuses_an_option_it_does_not_have(family: str, kind: str) -> None:
    """An option of another kind of the family, set on this one, is refused naming the kind."""
    own = {f.name for f in dataclasses.fields(registry(family)[kind].Config)}
    others = {f.name for c in family_configs(family).values() for f in dataclasses.fields(c)} - own
    for name in sorted(others)[:3]:
        path = f"{PATHS[family]}.{name}"
        with pytest.raises(ReglmError, match=rf"unknown option {path} \(kind '{kind}' has no such option\)"):
            build_config("tiny", [*RUN, *TRAINER_CONFIGS[(family, kind)], f"{path}=1"])
    raw = json.loads(trainer_config_of(family, kind).to_json())
    node = raw
    for name in PATHS[family].split("."):
        node = node[name]
    node["no_such_option"] = 1
    with pytest.raises(ReglmError, match=rf"unknown option\(s\) {PATHS[family]}.no_such_option"):
        RunConfig.from_dict(raw)


@pytest.mark.parametrize("kind", [k for f, k in TRAINER_CONFIGS if f == "batching"])
def test_a_batching_reads_training_batches_and_scores_every_token_once(kind: str) -> None:
    """Each batching builds its training batches (windows of the training split's tokens) and its
    evaluation reading, which scores every target of a split once, at any batch size."""
    cfg = trainer_config_of("batching", kind).train.batching
    ids = ids_of(200)
    ids[::7] = 0
    batches = training_batches(ids, cfg, 1, torch.device("cpu"), 0)
    window, advance, factor = batches.next(0, 0)
    windows = window if isinstance(window, list) else [window]
    assert advance >= 1 and factor > 0 and not batches.done(0)
    for w in windows:
        scored = w.positions >= 0
        assert scored.any() and torch.equal(ids[w.positions[scored]], w.targets[scored])
    assert trained_context(cfg) >= 1
    model = model_of("input", "embedding") if kind == "bptt" else stateless_model()
    for batch_size in (1, 3):
        sized = dataclasses.replace(cfg, test_batch_size=batch_size)
        result = evaluate(model, ids[:47], reading=eval_reading(sized, "test", 0), keep_token_nll=True)
        assert sorted(result.positions.tolist()) == list(range(1, 47)), batch_size


def stateless_model() -> LanguageModel:
    torch.manual_seed(0)
    return LanguageModel(config_of("encoder", "transformer").model, V, vocab())


@pytest.mark.parametrize("kind", [k for f, k in TRAINER_CONFIGS if f == "objective"])
def test_an_objective_builds_and_gives_a_finite_loss_and_score(kind: str, tmp_path: Path) -> None:
    """Each objective is built from its config (its frozen models loaded from model directories),
    gives a finite loss on a chunk and scores a split (the selection finite)."""
    overrides = [
        o.replace(BASE, str(tmp_path / "lm")).replace(DISC, str(tmp_path / "disc"))
        for o in TRAINER_CONFIGS[("objective", kind)]
    ]
    lm = trainer_config_of("objective", "lm")
    model = model_of("input", "embedding")
    save_model_dir(tmp_path / "lm", model, lm, vocab(), {})
    save_model_dir(
        tmp_path / "disc",
        model,
        build_config("tiny", [*RUN, "objective=discriminator", f"objective.base_model={tmp_path / 'lm'}"]),
        vocab(),
        {},
    )
    config = build_config("tiny", [*RUN, *overrides])
    objective = make_objective(config, vocab(), torch.device("cpu"))
    assert objective.kind == kind
    trained = model_of("input", "embedding")
    objective.prepare(trained)
    ids = ids_of(2, 9)
    out = trained(ids[:, :-1], trained.init_state(2))
    loss = objective.chunk_loss(trained, out, ids[:, :-1], ids[:, 1:], slice(0, 2), 2, False)
    assert loss.nll.shape == (2, 8) and torch.isfinite(loss.nll).all()
    scored = objective.score(
        trained, ids_of(40), eval_reading(config.train.batching, "valid", 0), torch.device("cpu"), False, "valid"
    )
    assert math.isfinite(scored.selection)
