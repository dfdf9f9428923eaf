"""Score a sentence with a `reglm export --format onnx` directory, using only numpy and onnxruntime.

    python examples/onnx_score.py RUN/best-onnx "the company said it expects"

Prints the natural-log probability of the sentence read from the start of a sentence (the state
after `<eos>`), its final `<eos>` scored: what `reglm.load(RUN).score(sentence)` returns (an OOV
word: log p(<unk>) - log(unknown_types), the unknown class shared among its word types).
"""

import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort


def score(export_dir: str, sentence: str) -> float:
    directory = Path(export_dir)
    spec = json.loads((directory / "export.json").read_text(encoding="utf-8"))
    vocab = spec["vocab"]
    if vocab["tokenizer"] is not None:
        raise SystemExit("a BPE export: segment the words with tokenizer.json (the tokenizers package) first")
    lines = (directory / vocab["file"]).read_text(encoding="utf-8").splitlines()
    stoi = {line.split("\t")[0]: i for i, line in enumerate(lines)}
    ids = [stoi.get(word, vocab["unk_id"]) for word in sentence.split()] + [vocab["eos_id"]]
    if None in ids:
        raise SystemExit("a word is not in the vocabulary, which has no <unk>")
    session = ort.InferenceSession(str(directory / spec["file"]), providers=["CPUExecutionProvider"])
    feeds = {"tokens": np.array([[vocab["eos_id"], *ids[:-1]]], dtype=np.int64)}
    for tensor in spec["interface"]["inputs"][1:]:  # the zero state of one stream
        feeds[tensor["name"]] = np.zeros([1 if d == "batch" else d for d in tensor["shape"]], dtype=np.float32)
    log_probs = session.run(["log_probs"], feeds)[0][0]  # (time, V)
    oov = sum(word not in stoi for word in sentence.split())
    return float(log_probs[np.arange(len(ids)), ids].astype(np.float64).sum() - oov * np.log(vocab["unknown_types"]))


if __name__ == "__main__":
    print(score(sys.argv[1], sys.argv[2]))
