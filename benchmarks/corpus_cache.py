"""The encoded-corpus cache: first encode and cached start-up, against reading the text as before.

For PTB and WikiText-2 (the offline copies in ../shared/data, read in place) and a generated
corpus of WikiText-103's size and shape (103,227,021 / 217,646 / 245,569 tokens, 267,735 word
types with ``<eos>`` and ``<unk>``, Zipf-distributed; lines as WikiText's: 35% blank, the others
86 words on average, about 5.2 bytes per token; the real one is not available offline):

* **first encode**: :func:`reglm.data.cache.load_cached` into an empty cache (count, vocabulary,
  ids written, manifest), wall and CPU seconds (the forked encoders' included), tokens per second
  (all three splits' tokens), and the load average before it (the machine is shared);
* **baseline**: the reader this replaces, line by line in Python (a dict of first appearance, then
  the vocabulary and a remap), in the same process; the ratio is baseline / first encode;
* **cached start-up**: in a fresh process (interpreter and imports not counted), the time to get
  the corpus from its entry, then to build the training plans on it (``StreamPlan`` trim, B = 80;
  ``BlockPlan``, 512 tokens, B = 8), and the process's resident memory: ``RssAnon`` (private
  memory) and ``RssFile`` (mapped file pages) after loading, after reading every training id once,
  and the peak ``VmHWM``; the same for the in-memory reader
  (:func:`reglm.data.corpus.load_directory`, int64 tensors) for comparison.

Targets (the issue): cached start-up <= 1 s for 100M tokens; first encode >= 5M tokens/s.

    python benchmarks/corpus_cache.py                        # all three, about 10 minutes here
    python benchmarks/corpus_cache.py --tokens 2000000 --skip-baseline-large   # a quick run
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from array import array
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from harness import RESULTS, environment, save

from reglm.data.cache import load_cached
from reglm.data.corpus import iter_lines
from reglm.data.vocab import EOS, Vocab

SHARED_DATA = Path(os.environ.get("REGLM_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
WT103_TOKENS = (103_227_021, 217_646, 245_569)
WT103_TYPES = 267_735
TARGET_STARTUP_S = 1.0
TARGET_TOKENS_PER_S = 5e6


def generate(root: Path, tokens: tuple[int, int, int], types: int, seed: int = 0) -> Path:
    """Write ``root/{train,valid,test}.txt``: Zipf(1) over ``types - 2`` words and ``<unk>`` (with
    ``<eos>`` that makes ``types``), word lengths growing with rank, lines as WikiText's."""
    if all((root / f"{s}.txt").is_file() for s in ("train", "valid", "test")):
        return root
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    n_words = types - 1
    ranks = np.arange(1, n_words + 1, dtype=np.float64)
    cdf = np.cumsum(1.0 / ranks)
    cdf /= cdf[-1]
    lengths = np.clip(np.rint(1.2 + 0.55 * np.log(ranks) + rng.normal(0, 0.8, n_words)), 1, 24).astype(np.int64)
    letters = np.frombuffer(b"etaoinshrdlcumwfgypbvkjxqz", dtype=np.uint8)
    seen: set[bytes] = set()
    words = []
    for rank, length in enumerate(lengths.tolist()):
        word = b"<unk>" if rank == 30 else letters[rng.integers(0, 26, length)].tobytes()
        while word in seen:
            word = letters[rng.integers(0, 26, len(word) + 1)].tobytes()
        seen.add(word)
        words.append(word + b" ")
    words.append(b"\n")  # id n_words: the end of a line
    pool = np.frombuffer(b"".join(words), dtype=np.uint8)
    size = np.array([len(w) for w in words])
    offset = np.cumsum(size) - size
    for split, count in zip(("train", "valid", "test"), tokens):
        with open(root / f"{split}.txt", "wb") as out:
            left = count
            while left > 0:
                lines = max(1, min(left, 2_000_000) // 56)
                blank = rng.random(lines) < 0.3527
                per_line = np.where(blank, 0, rng.geometric(1 / 86, lines))
                ids = np.searchsorted(cdf, rng.random(int(per_line.sum())))
                ends = np.cumsum(per_line)
                stream = np.insert(ids, ends, n_words)[:left]
                if stream[-1] != n_words:
                    stream[-1] = n_words
                left -= stream.size
                length = size[stream]
                start = np.cumsum(length) - length
                out.write(pool[np.repeat(offset[stream] - start, length) + np.arange(int(length.sum()))].tobytes())
    return root


def old_reader(directory: Path) -> tuple[Vocab, dict[str, torch.Tensor]]:
    """The corpus reader this cache replaces (reglm before it, ``corpus.py``): every line split in
    Python into an ``array('q')`` of ids by first appearance, the vocabulary, a remap; valid and
    test through the vocabulary's dict."""
    first_seen: dict[str, int] = {EOS: 0}
    provisional = array("q")
    for _, words in iter_lines(directory / "train.txt"):
        provisional.extend([first_seen.setdefault(w, len(first_seen)) for w in words])
        provisional.append(0)
    ids = np.frombuffer(provisional, dtype=np.int64)
    vocab = Vocab.build(Counter(dict(zip(first_seen, np.bincount(ids, minlength=len(first_seen)).tolist()))))
    table = np.array([vocab.stoi.get(w, vocab.unk_id) for w in first_seen], dtype=np.int64)
    out = {"train": torch.from_numpy(table[ids])}
    for split in ("valid", "test"):
        encoded = array("q")
        for _, words in iter_lines(directory / f"{split}.txt"):
            encoded.extend(vocab.encode(words))
            encoded.append(vocab.eos_id)
        out[split] = torch.from_numpy(np.frombuffer(encoded, dtype=np.int64).copy())
    return vocab, out


CHILD = r"""
import json, re, sys, time
from pathlib import Path
def rss():
    text = Path("/proc/self/status").read_text()
    kb = {k: int(re.search(rf"^{k}:\s+(\d+) kB", text, re.M).group(1)) for k in ("RssAnon", "RssFile", "VmHWM")}
    return {k: v * 1024 for k, v in kb.items()}
import torch
from reglm.data.cache import load_cached
from reglm.data.corpus import load_directory
from reglm.data.windows import BlockPlan, StreamPlan
directory, mode = Path(sys.argv[1]), sys.argv[2]
out = {"before": rss()}
start = time.perf_counter()
corpus = load_cached(directory, progress=False) if mode == "cached" else load_directory(directory)
out["load_s"] = time.perf_counter() - start
out["loaded"] = rss()
start = time.perf_counter()
StreamPlan(corpus.train, 80, "trim"), BlockPlan(corpus.train, 512, 8, seed=0)
out["plans_s"] = time.perf_counter() - start
chunk = 1 << 22
ids = corpus.train
out["ids_sum"] = sum(int(ids[lo : lo + chunk].sum(dtype=torch.int64)) for lo in range(0, ids.numel(), chunk))
out["after_pass"] = rss()
print(json.dumps(out))
"""


def child(directory: Path, mode: str, cache: Path) -> dict[str, Any]:
    env = {**os.environ, "REGLM_DATA_DIR": str(cache), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(directory), mode], env=env, capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measure(name: str, directory: Path, baseline: bool, cache_root: Path) -> dict[str, Any]:
    cache = cache_root / name
    os.environ["REGLM_DATA_DIR"] = str(cache)
    load = os.getloadavg()
    wall, cpu, children = time.perf_counter(), time.process_time(), _children_cpu()
    corpus = load_cached(directory, progress=sys.stderr.isatty())
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu + _children_cpu() - children
    tokens = sum(corpus.split(s).numel() for s in ("train", "valid", "test"))
    row: dict[str, Any] = {
        "tokens": tokens,
        "train_tokens": corpus.train.numel(),
        "vocab_size": len(corpus.vocab),
        "dtype": corpus.cache.dtype,
        "cache_bytes": sum(p.stat().st_size for p in corpus.cache.path.iterdir()),
        "load_average_before": [round(x, 2) for x in load],
        "first_encode_s": round(wall, 3),
        "first_encode_cpu_s": round(cpu, 3),
        "first_encode_tokens_per_s": round(tokens / wall),
        "first_encode_tokens_per_cpu_s": round(tokens / cpu),
    }
    if baseline:
        start = time.perf_counter()
        vocab, ids = old_reader(directory)
        row["baseline_s"] = round(time.perf_counter() - start, 3)
        row["baseline_tokens_per_s"] = round(tokens / row["baseline_s"])
        row["speedup"] = round(row["baseline_s"] / wall, 2)
        row["ids_identical"] = vocab == corpus.vocab and all(torch.equal(ids[s], corpus.split(s).long()) for s in ids)
        del vocab, ids
    del corpus
    row["cached"] = child(directory, "cached", cache)
    row["cached_startup_s"] = round(row["cached"]["load_s"], 4)
    if baseline:
        row["in_memory"] = child(directory, "memory", cache)
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--tokens",
        type=int,
        default=WT103_TOKENS[0],
        help="training tokens of the generated corpus (its valid/test keep WikiText-103's sizes)",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=Path(tempfile.gettempdir()) / "reglm-corpus-cache-bench",
        help="where the generated corpus is kept between runs",
    )
    parser.add_argument(
        "--skip-baseline-large", action="store_true", help="do not run the old reader on the generated corpus (minutes)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "corpus-cache-cpu.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    corpora = {
        name: SHARED_DATA / name for name in ("ptb", "wikitext-2") if (SHARED_DATA / name / "train.txt").is_file()
    }
    sizes = (args.tokens, *WT103_TOKENS[1:])
    generated = generate(args.workdir / f"zipf-{args.tokens}", sizes, WT103_TYPES)
    corpora[f"generated-{args.tokens // 1_000_000}M"] = generated
    results: dict[str, Any] = {
        "environment": environment(torch.device("cpu"), "benchmarks/corpus_cache.py", argv),
        "targets": {"cached_startup_s": TARGET_STARTUP_S, "first_encode_tokens_per_s": TARGET_TOKENS_PER_S},
    }
    with tempfile.TemporaryDirectory(prefix="reglm-cache-") as cache_root:
        for name, directory in corpora.items():
            baseline = not (args.skip_baseline_large and name.startswith("generated"))
            results[name] = measure(name, directory, baseline, Path(cache_root))
            print(
                name, json.dumps({k: v for k, v in results[name].items() if not isinstance(v, dict)}), file=sys.stderr
            )
    save(results, args.out)


if __name__ == "__main__":
    main()
