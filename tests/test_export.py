"""reglm export and the pretrained directory: exported graphs against PyTorch over carried-state
streams, int8 that really quantizes, the numpy-only example loader, save/from_pretrained, the CLI.

The references are independent of the exporter's own check: each test runs the exported file in
its runtime with a stream of its own (other batch size, other chunk lengths) and compares it with
the trained reglm model, read with its opaque state.
"""

from __future__ import annotations

import ast
import contextlib
import importlib.util
import io
import json
import random
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

import reglm
from reglm.api import TrainedModel
from reglm.cli import main
from reglm.config import ModelConfig, RunConfig
from reglm.config.schema import DataConfig
from reglm.data.vocab import Vocab
from reglm.errors import ReglmError
from reglm.export import export_model
from reglm.modeldir import save_model_dir
from reglm.models import LanguageModel
from reglm.outputs.base import OutputLayer
from reglm.outputs.mixture import MixtureOfSoftmaxes

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")

REPO = Path(__file__).resolve().parents[1]
V = 50
WORDS = [f"w{i}" for i in range(V - 2)]
DROPOUTS = dict(embed_dropout=0.1, input_dropout=0.2, hidden_dropout=0.2, output_dropout=0.2)

KINDS = {
    "awd-lstm-tied": dict(emb_size=8, hidden_size=12, num_layers=3, weight_dropout=0.4, **DROPOUTS),
    "awd-lstm-untied-no-bias": dict(
        emb_size=8, hidden_size=12, num_layers=2, tie_weights=False, output_bias=False, **DROPOUTS
    ),
    "vd-lstm": dict(encoder="vd-lstm", emb_size=8, hidden_size=10, num_layers=2, hidden_dropout=0.3, tie_weights=False),
    "doc": dict(
        emb_size=6,
        hidden_size=10,
        last_hidden_size=9,
        num_layers=3,
        output="doc",
        n_experts=3,
        doc_experts="2,1",
        latent_dropout=0.2,
    ),
    "adaptive-softmax-lstm": dict(
        input="adaptive",
        input__dim=8,
        input__cutoffs="10,30",
        input__factor=2,
        hidden_size=12,
        output="adaptive",
        output__cutoffs="10,30",
        output__factor=2,
        output__tie="projections",
        output__tail_dropout=0.2,
    ),
    "transformer-adaptive": dict(
        input="adaptive",
        input__dim=16,
        input__cutoffs="10,30",
        input__factor=2,
        encoder="transformer",
        encoder__d_model=16,
        encoder__layers=2,
        encoder__heads=2,
        encoder__ffn_dim=32,
        encoder__dropout=0.1,
        output="adaptive",
        output__cutoffs="10,30",
        output__factor=2,
        output__tie="head",
    ),
    "transformer-tied-softmax": dict(
        emb_size=12,
        encoder="transformer",
        encoder__d_model=16,
        encoder__layers=1,
        encoder__heads=2,
        encoder__ffn_dim=32,
        encoder__output_dim=12,
    ),
    "qrnn-window-2": dict(
        encoder="qrnn", emb_size=8, hidden_size=12, num_layers=3, encoder__zoneout=0.2, weight_dropout=0.3, **DROPOUTS
    ),
    "qrnn-window-1-mos": dict(
        encoder="qrnn", encoder__window=1, emb_size=6, hidden_size=10, num_layers=2, output="mos", n_experts=2
    ),
    "char-cnn": dict(
        input="char-cnn",
        input__char_emb_size=4,
        input__filters="1:4,2:5",
        input__highway=1,
        input__dim=8,
        input__max_chars=6,
        hidden_size=12,
        tie_weights=False,
    ),
}


def _vocab() -> Vocab:
    return Vocab(["<eos>", "<unk>", *WORDS], [0] * V)


def _lm(kind: str) -> TrainedModel:
    torch.manual_seed(0)
    model = LanguageModel(ModelConfig.build(**KINDS[kind]), V, _vocab())
    return TrainedModel(model, _vocab(), torch.device("cpu"))


def _stream(lm: TrainedModel, run, initial: list[torch.Tensor], chunks=(4, 1, 6), batch: int = 3) -> float:
    """Largest |log p| difference between ``run(tokens, state) -> (log_probs, state)`` and the
    reglm model over ``chunks`` of ``batch`` streams, both carrying their state."""
    generator = torch.Generator().manual_seed(7)
    reference, state, worst = lm.model.init_state(batch), initial, 0.0
    with torch.no_grad():
        for length in chunks:
            ids = torch.randint(0, V, (batch, length), generator=generator)
            out = lm.model(ids, reference)
            reference = out.state
            log_probs, state = run(ids, state)
            worst = max(worst, float((torch.as_tensor(log_probs) - lm.model.output.predict(out)).abs().max()))
    return worst


def _zeros(spec: dict, batch: int) -> list:
    return [
        np.zeros([batch if d == "batch" else d for d in t["shape"]], dtype=np.float32)
        for t in spec["interface"]["inputs"][1:]
    ]


@pytest.fixture(scope="module")
def onnx_export(tmp_path_factory: pytest.TempPathFactory):
    """``get(kind) -> (model, export directory)``, each kind exported once."""
    pytest.importorskip("onnxruntime", reason="the ONNX export needs onnxruntime (pip install 'reglm[export]')")
    root, done = tmp_path_factory.mktemp("onnx"), {}

    def get(kind: str) -> tuple[TrainedModel, Path]:
        if kind not in done:
            lm = _lm(kind)
            export_model(lm, root / kind, "onnx")
            done[kind] = lm, root / kind
        return done[kind]

    return get


@pytest.mark.parametrize("kind", list(KINDS))
def test_onnx_equals_pytorch_over_a_stream_with_carried_state(kind: str, onnx_export) -> None:
    import onnxruntime as ort

    lm, directory = onnx_export(kind)
    spec = json.loads((directory / "export.json").read_text())
    assert spec["check"]["max_abs_log_prob_diff"] < 1e-4
    session = ort.InferenceSession(str(directory / spec["file"]), providers=["CPUExecutionProvider"])
    names = [t["name"] for t in spec["interface"]["inputs"]]
    assert [i.name for i in session.get_inputs()] == names and [o.name for o in session.get_outputs()] == [
        t["name"] for t in spec["interface"]["outputs"]
    ]
    assert spec["stateful"] == (lm.model.cfg.encoder.kind != "transformer") == bool(spec["interface"]["state"])

    def run(ids, state):
        out = session.run(None, {"tokens": ids.numpy(), **dict(zip(names[1:], state))})
        return out[0], out[1:]

    assert _stream(lm, run, _zeros(spec, 3)) < 1e-4


@pytest.mark.parametrize("kind", ["doc", "transformer-adaptive", "qrnn-window-2"])
def test_torchscript_equals_pytorch(kind: str, tmp_path: Path) -> None:
    lm = _lm(kind)
    spec = export_model(lm, tmp_path / "ts", "torchscript")
    module = torch.jit.load(str(tmp_path / "ts" / "model.pt"))
    zeros = [torch.from_numpy(z) for z in _zeros(spec, 3)] if spec["stateful"] else []
    assert _stream(lm, module, zeros) < 1e-5


def test_the_exported_kinds_cover_every_registered_component() -> None:
    """Every registered input layer, encoder and output layer is exported by the ONNX test above."""
    from reglm.encoders import ENCODERS
    from reglm.inputs import INPUTS
    from reglm.outputs import OUTPUTS

    built = [ModelConfig.build(**options) for options in KINDS.values()]
    for stage, registry in (("input", INPUTS), ("encoder", ENCODERS), ("output", OUTPUTS)):
        assert {getattr(cfg, stage).kind for cfg in built} == set(registry), stage


def test_qrnn_state_is_its_carried_tensors_and_time_stays_dynamic(onnx_export) -> None:
    """The first layer (window 2) carries c and its last input; the window-1 layers only c; the
    graph's fo-pooling is a loop, so a chunk longer than any the export saw still matches."""
    lm, directory = onnx_export("qrnn-window-2")
    spec = json.loads((directory / "export.json").read_text())
    shapes = {t["name"]: t["shape"] for t in spec["interface"]["inputs"][1:]}
    assert shapes == {"c0_0": ["batch", 12], "x0_0": ["batch", 8], "c0_1": ["batch", 12], "c0_2": ["batch", 8]}
    assert [s["output"] for s in spec["interface"]["state"]] == ["cn_0", "xn_0", "cn_1", "cn_2"]
    import onnx
    import onnxruntime as ort

    assert "Loop" in {node.op_type for node in onnx.load(str(directory / spec["file"])).graph.node}
    session = ort.InferenceSession(str(directory / spec["file"]), providers=["CPUExecutionProvider"])

    def run(ids, state):
        out = session.run(None, {"tokens": ids.numpy(), **dict(zip(shapes, state))})
        return out[0], out[1:]

    assert _stream(lm, run, _zeros(spec, 2), chunks=(17, 2), batch=2) < 1e-4


def test_an_unexportable_kind_is_a_reglm_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A component without its own inference module is refused by that declaration (the output
    layers' default), naming its option."""
    monkeypatch.setattr(MixtureOfSoftmaxes, "export_module", OutputLayer.export_module)
    refused = "model.output.kind=doc cannot be exported: the output layer MixtureOfSoftmaxes has no inference module"
    with pytest.raises(ReglmError, match=refused):
        export_model(_lm("doc"), tmp_path / "x", "torchscript")
    with pytest.raises(ReglmError, match="--format tflite is not supported"):
        export_model(_lm("vd-lstm"), tmp_path / "x", "tflite")
    with pytest.raises(ReglmError, match="--text"):
        export_model(_lm("vd-lstm"), tmp_path / "x", "torchscript", "int8")
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------------ a trained model, its run config and corpus


def _sentences(rng: random.Random, n: int) -> list[str]:
    """A small bigram language: each word mostly followed by one of two successors."""
    out = []
    for _ in range(n):
        word, sentence = rng.randrange(20), []
        for _ in range(rng.randint(3, 8)):
            sentence.append(f"w{word}")
            word = (word * 3 + rng.choice((1, 1, 1, 2))) % 20
        out.append(" ".join(sentence))
    return out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model directory of an AWD-LSTM trained for 128 SGD steps on a corpus directory its config
    names (so ``reglm export --quantize`` can read the validation split)."""
    root = tmp_path_factory.mktemp("export")
    rng = random.Random(0)
    data = root / "data"
    data.mkdir()
    for split, n in (("train", 400), ("valid", 60), ("test", 60)):
        (data / f"{split}.txt").write_text("\n".join(_sentences(rng, n)) + "\n")
    words = [w for line in (data / "train.txt").read_text().splitlines() for w in [*line.split(), "<eos>"]]
    vocab = Vocab.build(Counter(words))
    cfg = ModelConfig.build(
        emb_size=16, hidden_size=24, num_layers=2, weight_dropout=0.2, hidden_dropout=0.1, output_dropout=0.1
    )
    torch.manual_seed(0)
    model = LanguageModel(cfg, len(vocab))
    stream = torch.tensor(vocab.encode(words))
    batch = stream[: stream.numel() // 8 * 8].view(8, -1)
    for _ in range(4):  # plain SGD by hand: a torch.optim optimizer would import torch._dynamo (seconds)
        state = model.init_state(8)
        for start in range(0, batch.size(1) - 1, 10):
            x, y = batch[:, start : start + 10], batch[:, start + 1 : start + 11]
            nll, state = model.nll(x[:, : y.size(1)], y, state)
            model.zero_grad()
            nll.mean().backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.25)
            with torch.no_grad():
                for p in model.parameters():
                    p -= 20.0 * p.grad
            state = state.detach()
    config = RunConfig(data=DataConfig(name=str(data)), model=cfg)
    save_model_dir(root / "best", model.eval(), config, vocab)
    return root / "best"


@pytest.fixture(scope="module")
def cli_onnx(model_dir: Path) -> tuple[Path, str]:
    """``reglm export MODEL --format onnx`` (the default --out) and what it printed."""
    pytest.importorskip("onnxruntime", reason="the ONNX export needs onnxruntime (pip install 'reglm[export]')")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["export", str(model_dir), "--format", "onnx"]) == 0
    return model_dir.with_name("best-onnx"), printed.getvalue()


def test_cli_export_writes_the_directory_and_checks_it(model_dir: Path, cli_onnx: tuple[Path, str]) -> None:
    out, printed = cli_onnx
    assert sorted(p.name for p in out.iterdir()) == ["export.json", "model.onnx", "vocab.txt"]
    assert (out / "vocab.txt").read_bytes() == (model_dir / "vocab.txt").read_bytes()
    spec = json.loads((out / "export.json").read_text())
    assert spec["opset"] == 17 and spec["vocab"]["eos_id"] == 0 and spec["model"]["source"] == str(model_dir)
    assert [t["name"] for t in spec["interface"]["inputs"]] == ["tokens", "h0_0", "c0_0", "h0_1", "c0_1"]
    assert spec["interface"]["state"][1] == {"input": "c0_0", "output": "cn_0"}
    assert "check: max |log p(onnx) - log p(PyTorch)|" in printed and "state carried" in printed
    # a second export replaces the files the first one wrote, and only those: a user's file stays
    again = out.with_name("again")
    shutil.copytree(out, again)
    (again / "notes.txt").write_text("mine")
    assert main(["export", str(model_dir), "--format", "torchscript", "--out", str(again)]) == 0
    assert sorted(p.name for p in again.iterdir()) == ["export.json", "model.pt", "notes.txt", "vocab.txt"]
    assert (again / "notes.txt").read_text() == "mine"
    assert json.loads((again / "export.json").read_text())["files"] == ["model.pt", "vocab.txt", "export.json"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["export", "MISSING", "--format", "onnx"], "does not exist"),
        (["export", "MODEL", "--format", "tflite"], "--format tflite is not supported; choose onnx or torchscript"),
        (["export", "MODEL", "--format", "torchscript", "--quantize", "int4"], "--quantize int4 is not supported"),
        (["export", "MODEL", "--format", "torchscript", "--out", "UNRELATED"], "not empty and holds no export"),
        (["export", "MODEL", "--format", "onnx", "--text", "MISSING"], "--text measures the perplexity change of int8"),
        (["export", "MODEL", "--format", "onnx", "--quantize", "int8", "--text", "MISSING"], "cannot be read"),
    ],
)
def test_cli_export_bad_input_is_one_line_and_exit_2(
    argv: list[str], message: str, model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    unrelated = tmp_path / "mine"
    unrelated.mkdir()
    (unrelated / "notes.txt").write_text("keep me")
    paths = {"MISSING": str(tmp_path / "missing"), "MODEL": str(model_dir), "UNRELATED": str(unrelated)}
    assert main([paths.get(a, a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("reglm: error: ") and err.count("\n") == 1 and message in err
    assert (unrelated / "notes.txt").read_text() == "keep me" and sorted(p.name for p in unrelated.iterdir()) == [
        "notes.txt"
    ]


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_int8_really_quantizes_and_costs_under_two_percent(
    fmt: str, model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    if fmt == "onnx":
        onnx = pytest.importorskip(
            "onnx", reason="the ONNX export needs onnx and onnxruntime (pip install 'reglm[export]')"
        )
        pytest.importorskip("onnxruntime", reason="the ONNX export needs onnxruntime (pip install 'reglm[export]')")
    out = tmp_path / fmt
    # ONNX: the run's validation split; TorchScript: a text of one's own
    text = [] if fmt == "onnx" else ["--text", str(model_dir.parent / "data" / "test.txt")]
    assert main(["export", str(model_dir), "--format", fmt, "--quantize", "int8", "--out", str(out), *text]) == 0
    spec = json.loads((out / "export.json").read_text())
    quant = spec["quantization"]
    assert (
        spec["precision"] == "int8"
        and quant["int8_bytes"] == (out / spec["file"]).stat().st_size < quant["float32_bytes"]
    )
    assert quant["perplexity"]["text"] == (
        text[1] if text else f"the first {quant['perplexity']['tokens']} tokens of {model_dir.parent / 'data'} valid"
    )
    assert abs(quant["perplexity"]["change"]) < 0.02
    assert quant["perplexity"]["float32"] < 15, (
        "the trained model must be far from uniform (50 words) for the comparison to mean something"
    )
    if fmt == "onnx":
        ops = {node.op_type for node in onnx.load(str(out / "model.onnx")).graph.node}
        assert {"DynamicQuantizeLSTM", "MatMulInteger"} <= ops and "LSTM" not in ops
    else:
        types = {m._c._type().qualified_name() for m in torch.jit.load(str(out / "model.pt")).modules()}
        assert {
            "__torch__.torch.ao.nn.quantized.dynamic.modules.rnn.LSTM",
            "__torch__.torch.ao.nn.quantized.dynamic.modules.linear.Linear",
        } <= types
        assert not any(t.endswith("torch.nn.modules.rnn.LSTM") for t in types)
    assert "int8:" in capsys.readouterr().out


def _example():
    spec = importlib.util.spec_from_file_location("onnx_score", REPO / "examples" / "onnx_score.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_loader_uses_numpy_and_onnxruntime_only_and_reproduces_score(
    model_dir: Path, cli_onnx: tuple[Path, str], onnx_export
) -> None:
    source = (REPO / "examples" / "onnx_score.py").read_text()
    assert len(source.splitlines()) <= 40
    imported = {
        alias.name.split(".")[0]
        for node in ast.walk(ast.parse(source))
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for alias in getattr(node, "names", [])
    }
    imported |= {node.module.split(".")[0] for node in ast.walk(ast.parse(source)) if isinstance(node, ast.ImportFrom)}
    assert imported <= {"json", "sys", "pathlib", "Path", "numpy", "onnxruntime"}
    example = _example()
    lm = reglm.load(model_dir)
    for sentence in ["w1 w4 w13", "w0", "", "w3 w10 w1 w4 w13 w1"]:
        assert example.score(str(cli_onnx[0]), sentence) == pytest.approx(lm.score(sentence), abs=1e-4)
    transformer, directory = onnx_export("transformer-adaptive")
    for sentence in ["w1 w4 w13", "", "w3 zebra w10 w1"]:  # this vocabulary has <unk>
        assert example.score(str(directory), sentence) == pytest.approx(transformer.score(sentence), abs=1e-4)


# ---------------------------------------------------------------------------- pretrained directories and the Hub


def test_save_pretrained_and_from_pretrained_round_trip(model_dir: Path, tmp_path: Path) -> None:
    lm = reglm.from_pretrained(model_dir)
    assert lm.run_config.data.name == str(model_dir.parent / "data")
    assert lm.save_pretrained(tmp_path / "pre") == tmp_path / "pre"
    assert sorted(p.name for p in (tmp_path / "pre").iterdir()) == ["config.json", "model.safetensors", "vocab.txt"]
    again = reglm.from_pretrained(tmp_path / "pre")
    assert again.run_config == lm.run_config
    sentences = ["w1 w4 w13", "w7 w2", ""]
    assert [again.score(s) for s in sentences] == [lm.score(s) for s in sentences]
    assert reglm.load(tmp_path / "pre").score("w1 w4") == lm.score("w1 w4")
    # a model built by hand has no run configuration: its model section is kept
    hand = _lm("transformer-adaptive")
    hand.save_pretrained(tmp_path / "hand")
    back = reglm.from_pretrained(tmp_path / "hand")
    assert back.model.cfg == hand.model.cfg and back.score("w3 w9") == hand.score("w3 w9")
    assert "unknown" in json.loads((tmp_path / "hand" / "config.json").read_text())["info"]["run_config"]


def test_save_pretrained_refuses_unrelated_targets(model_dir: Path, tmp_path: Path) -> None:
    lm = reglm.load(model_dir)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ReglmError, match="is a file"):
        lm.save_pretrained(tmp_path / "file")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text("{}")
    with pytest.raises(ReglmError, match="holds no reglm model"):
        lm.save_pretrained(tmp_path / "run")
    assert (tmp_path / "run" / "config.json").read_text() == "{}"
    lm.save_pretrained(tmp_path / "saved")
    before = (tmp_path / "saved" / "model.safetensors").read_bytes()
    with pytest.raises(ReglmError, match="overwrite=True"):
        lm.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "model.safetensors").read_bytes() == before
    assert lm.save_pretrained(tmp_path / "saved", overwrite=True) == tmp_path / "saved"
    with pytest.raises(ReglmError, match="does not exist"):
        reglm.from_pretrained(str(tmp_path / "nowhere"))


def test_hub_download_and_upload_go_through_huggingface_hub(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub = pytest.importorskip(
        "huggingface_hub", reason="the Hub integration needs huggingface_hub (pip install 'reglm[hub]')"
    )
    lm = reglm.from_pretrained(model_dir)
    calls = []

    def snapshot_download(repo_id, revision=None, token=None, allow_patterns=None):
        calls.append((repo_id, revision, allow_patterns))
        return str(model_dir)

    class FakeApi:
        def __init__(self, token=None):
            self.token = token

        def create_repo(self, repo_id, private=None, exist_ok=False):
            calls.append(("create", repo_id, private, exist_ok))

        def upload_folder(self, repo_id, folder_path, commit_message):
            calls.append(("upload", repo_id, sorted(p.name for p in Path(folder_path).iterdir())))
            return "https://example.invalid/commit/1"

    monkeypatch.setattr(hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(hub, "HfApi", FakeApi)
    remote = reglm.from_pretrained("someone/tiny-lstm", revision="v1")
    assert calls[0] == ("someone/tiny-lstm", "v1", ["config.json", "model.safetensors", "vocab.txt", "tokenizer.json"])
    assert remote.score("w1 w4") == lm.score("w1 w4") and remote.run_config == lm.run_config
    assert lm.push_to_hub("someone/tiny-lstm", private=True) == "https://example.invalid/commit/1"
    assert calls[1:] == [
        ("create", "someone/tiny-lstm", True, True),
        ("upload", "someone/tiny-lstm", ["config.json", "model.safetensors", "vocab.txt"]),
    ]
