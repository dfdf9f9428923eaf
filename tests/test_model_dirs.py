"""A model directory from elsewhere is untrusted: absurd sizes, deep or huge JSON, odd counts in
vocab.txt and weights of another dtype, shape or with NaNs are refused with a ReglmError, before
anything large is allocated, by the library and by every command (one line, exit 2)."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import reglm
from reglm.cli import main
from reglm.config import build_config
from reglm.errors import ReglmError
from reglm.train.run import train


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("model") / "run"
    train(
        build_config("tiny", ["data.synthetic_sentences=200", "train.epochs=1", "train.finetune_epochs=0"]),
        run,
        progress=False,
    )
    return run / "best"


@pytest.fixture
def copy(model: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(model, tmp_path / "model"))


def refused(directory: Path, fragment: str, capsys: pytest.CaptureFixture) -> None:
    """Both the library and ``reglm score`` refuse ``directory`` with ``fragment``, within seconds."""
    started = time.perf_counter()
    with pytest.raises(ReglmError, match=fragment):
        reglm.load(directory)
    text = directory.parent / "text.txt"
    text.write_text("w1 w2\n")
    assert main(["score", str(directory), str(text)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("reglm: error:") and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert time.perf_counter() - started < 20


def edit_config(directory: Path, **sizes: int) -> None:
    meta = json.loads((directory / "config.json").read_text())
    meta["config"]["model"]["encoder"].update(sizes)
    (directory / "config.json").write_text(json.dumps(meta))


def test_absurd_sizes_in_config_json_are_refused_before_allocating(copy: Path, capsys: pytest.CaptureFixture) -> None:
    for sizes in ({"hidden_size": 200_000}, {"hidden_size": 10**12}, {"num_layers": 100_000}):
        edit_config(copy, **sizes)
        refused(copy, "do not belong to the model|too large to build", capsys)


def test_a_model_larger_than_the_memory_is_refused(
    copy: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("reglm.devices.device_memory", lambda device: 100_000)
    refused(copy, r"loading needs about .* GiB, more than the", capsys)


def test_deep_or_huge_config_json_is_refused(copy: Path, capsys: pytest.CaptureFixture) -> None:
    config = copy / "config.json"
    for text in ("[" * 200_000 + "]" * 200_000, '{"config": ' + "[" * 100 + "]" * 100 + "}"):
        config.write_text(text)
        refused(copy, "nests deeper than", capsys)
    config.write_text('{"config": {}, "pad": "' + "x" * (5 << 20) + '"}')
    refused(copy, "larger than", capsys)


@pytest.mark.parametrize(
    "count", ["\u0663", "1" * 5000, "\u00b2"], ids=["arabic-indic-digit", "5000-digits", "superscript"]
)
def test_odd_counts_in_vocab_txt_are_refused(count: str, copy: Path, capsys: pytest.CaptureFixture) -> None:
    vocab = copy / "vocab.txt"
    lines = vocab.read_text().splitlines()
    lines[2] = lines[2].split("\t")[0] + "\t" + count
    vocab.write_text("\n".join(lines) + "\n")
    refused(copy, "malformed at line 3", capsys)


@pytest.mark.parametrize("damage", ["integer", "nan", "shape", "extra"])
def test_weights_of_another_dtype_shape_or_not_finite_are_refused(
    damage: str, copy: Path, capsys: pytest.CaptureFixture
) -> None:
    path = copy / "model.safetensors"
    tensors = load_file(str(path))
    name = next(iter(tensors))
    if damage == "integer":
        tensors[name] = tensors[name].to(torch.int32)
    elif damage == "nan":
        tensors[name][0, 0] = float("nan")
    elif damage == "shape":
        tensors[name] = tensors[name][:-1]
    else:
        tensors["extra"] = torch.zeros(3)
    save_file(tensors, str(path))
    fragment = {
        "integer": "is I32",
        "nan": "NaN or infinite",
        "shape": "the model needs F32",
        "extra": "holds tensors the model does not have",
    }[damage]
    refused(copy, fragment, capsys)


def test_a_truncated_or_lying_weights_header_is_refused(copy: Path, capsys: pytest.CaptureFixture) -> None:
    path = copy / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    refused(copy, "not a complete safetensors file", capsys)
    path.write_bytes((10**15).to_bytes(8, "little") + data[8:])
    refused(copy, "header length does not fit", capsys)


def test_a_deeply_nested_tokenizer_json_is_refused(tmp_path: Path) -> None:
    pytest.importorskip("tokenizers", reason="BPE models need tokenizers (pip install 'reglm[bpe]')")
    from reglm.data.bpe import BPEVocab
    from reglm.data.vocab import Vocab

    path = tmp_path / "tokenizer.json"
    path.write_text('{"model": ' + "[" * 200_000 + "]" * 200_000 + "}")
    with pytest.raises(ReglmError, match="not a reglm BPE tokenizer"):
        BPEVocab.from_tokenizer_file(Vocab(["<eos>", "a"], [1, 1]), path)
