"""Pieces the command families share: data options, output files, labels, stopping on signals."""

from __future__ import annotations

import argparse
import math
import os
import signal
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reglm.errors import ReglmError


def _custom_corpus(name: str) -> bool:
    """Whether ``data.name`` names a directory rather than a built-in corpus (which wins over a
    directory of the same name, as in :func:`reglm.data.resolve`)."""
    from reglm.data import SOURCES

    return name not in SOURCES and name != "synthetic"


def with_absolute_paths(config: Any) -> Any:
    """``config`` with its custom corpus directory (``data.name``) and its download cache
    (``data.data_dir``) as absolute paths, as a new run stores them, so that the run can be
    evaluated or resumed from any directory. Built-in names (``ptb``, ``synthetic``) stay names;
    a name that is no existing directory is left for the corpus loader to refuse."""
    data: dict[str, str] = {}
    name = config.data.name
    if _custom_corpus(name) and Path(name).expanduser().is_dir():
        data["name"] = os.path.abspath(Path(name).expanduser())
    if config.data.data_dir is not None:
        data["data_dir"] = os.path.abspath(Path(config.data.data_dir).expanduser())
    return config.replace({"data": data}) if data else config


def add_data_options(p: argparse.ArgumentParser, with_vocab: bool = True) -> None:
    p.add_argument(
        "--data",
        help="ptb, wikitext-2, wikitext-103, lm1b, synthetic, or a directory with train.txt/valid.txt/test.txt",
    )
    p.add_argument(
        "--data-dir", help="download cache for built-in corpora (default: $REGLM_DATA_DIR or ~/.cache/reglm)"
    )
    if with_vocab:
        p.add_argument("--min-freq", type=int, help="map training words seen fewer times to <unk>")
        p.add_argument("--max-vocab", type=int, help="keep only this many most frequent words")


DEFAULT_THREADS = 1
"""PyTorch's CPU threads when neither ``--threads`` nor ``OMP_NUM_THREADS`` says (measured with
``benchmarks/threads.py``: see the README's "CPU threads")."""


def add_threads_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help=f"CPU threads for PyTorch (default: $OMP_NUM_THREADS when set, else {DEFAULT_THREADS})",
    )


def set_threads(option: int | None) -> int:
    """Set PyTorch's intra-op CPU threads: ``--threads N``, else ``$OMP_NUM_THREADS`` (which
    PyTorch read at start), else :data:`DEFAULT_THREADS`. Returns the count."""
    import torch

    if option is not None and option < 1:
        raise ReglmError(f"--threads {option} must be >= 1")
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if option is None and env.isdigit() and int(env) >= 1:
        return torch.get_num_threads()
    threads = option if option is not None else DEFAULT_THREADS
    torch.set_num_threads(threads)
    return threads


@dataclass
class ScoredRun:
    """A trained LM loaded with the corpus it is scored on (``reglm eval``, ``analyze --by-frequency``)."""

    directory: Path
    model: Any
    config: Any
    vocab: Any
    corpus: Any
    device: Any

    @property
    def subword(self) -> bool:
        from reglm.data.bpe import is_subword

        return is_subword(self.vocab)


def load_scored_run(run: str, checkpoint: str, data: str | None, data_dir: str | None) -> ScoredRun:
    """The ``checkpoint`` model of ``run`` (a run or model directory; ``state``: the weights of
    the run's latest ``state.pt``) on its device, and its corpus (``data``/``data_dir`` override
    the run's), whose vocabulary must be the model's; a sub-word model's tokenizer segments the corpus."""
    from reglm.data import load_corpus
    from reglm.devices import resolve_device
    from reglm.modeldir import load_model_dir
    from reglm.rundir import STATE_FILE, model_dir, require_kind, require_same_vocab
    from reglm.train.checkpoint import load_state_model

    device = resolve_device("auto")
    if checkpoint == "state":
        directory = Path(run) / STATE_FILE
        model, config, vocab = load_state_model(Path(run), device)
    else:
        directory = model_dir(run, checkpoint)
        model, config, vocab = load_model_dir(directory, device)
    require_kind(config.objective.kind, directory, "lm")
    config = config.replace({"data": {key: value for key, value in (("name", data), ("data_dir", data_dir)) if value}})
    name = config.data.name
    if data is None and _custom_corpus(name) and not Path(name).expanduser().is_dir():
        relative = "" if Path(name).expanduser().is_absolute() else f", read from the current directory {Path.cwd()}"
        raise ReglmError(
            f"the corpus directory the model was trained on, {name!r} (data.name in "
            f"{directory / 'config.json'}{relative}), does not exist; give the corpus with --data DIR"
        )
    loaded = ScoredRun(directory, model, config, vocab, None, device)
    loaded.corpus = load_corpus(config, vocab if loaded.subword else None)
    require_same_vocab(
        vocab,
        loaded.corpus.vocab,
        f"the checkpoint {directory}",
        f"the corpus {config.data.name!r}",
        "evaluate on the corpus it was trained on",
        strict=True,
    )
    return loaded


@contextmanager
def handling_signals(handler: Callable[[int, Any], None]) -> Iterator[None]:
    """``handler`` for SIGINT and SIGTERM while the block runs; the previous handlers after."""
    previous = {signum: signal.signal(signum, handler) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def print_table(rows: list[dict[str, Any]], columns: list[tuple[str, str, str]]) -> None:
    """``rows`` as a text table under a ``run`` column of labels; ``columns`` are
    ``(header, key, format spec)``, each right-aligned to its header's width; a missing value
    (None or NaN) is shown as ``-``."""
    width = max(len("run"), *(len(row["label"]) for row in rows))
    print(" ".join([f"{'run':{width}s}", *(f"{header:>{len(header)}s}" for header, _, _ in columns)]))
    for row in rows:
        cells = (f"{_cell(row[key], spec):>{len(header)}s}" for header, key, spec in columns)
        print(" ".join([f"{row['label']:{width}s}", *cells]))


def _cell(value: Any, spec: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def check_output_file(option: str, path: str | None) -> None:
    if path is None:
        return
    target = Path(path)
    if target.is_dir():
        raise ReglmError(f"{option} {path} is a directory; give a file name")
    parent = next((p for p in target.absolute().parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise ReglmError(f"{option} {path}: {parent} is a file, not a directory; choose another path")


def refuse_inputs(option: str, path: str | Path | None, inputs: Iterable[str | Path | None]) -> None:
    """A ReglmError when the output ``path`` is one of the command's ``inputs`` (a file, an input
    directory or any file directly inside one), under any name: a symbolic or a hard link to it
    is the same file. An output never replaces what the command reads."""
    if path is None:
        return
    try:
        target = Path(path).stat()
    except OSError:
        return
    for source in inputs:
        if source is None or str(source) == "-":
            continue
        source = Path(source)
        try:
            files = [source, *source.iterdir()] if source.is_dir() else [source]
        except OSError:
            continue
        for file in files:
            try:
                seen = file.stat()
            except OSError:
                continue
            if (seen.st_dev, seen.st_ino) == (target.st_dev, target.st_ino):
                where = "" if os.path.abspath(path) == os.path.abspath(file) else f" (the same file as {file})"
                raise ReglmError(
                    f"{option} {path}{where} is read by this command: the output would replace its own input; "
                    f"choose another {option.split(':')[0]}"
                )


def write_output(option: str, path: str, writer: Callable[[], None]) -> None:
    try:
        writer()
    except OSError as exc:
        raise ReglmError(f"cannot write {option} {path} ({exc.strerror or exc}); choose a writable path") from None


def run_labels(labels: str | None, runs: list[str]) -> list[str]:
    """``--labels a,b`` split into one label per run; by default each run directory's name."""
    if labels is None:
        return [Path(run).resolve().name or str(run) for run in runs]
    names = [name.strip() for name in labels.split(",")]
    if len(names) != len(runs):
        raise ReglmError(
            f"--labels gives {len(names)} label(s) for {len(runs)} run(s); give one label per run, separated by commas"
        )
    if not all(names):
        raise ReglmError(f"--labels {labels!r} holds an empty label; give a non-empty label for every run")
    return names


@contextmanager
def writing_into(out: Path) -> Iterator[None]:
    """Around the writes of a command's results into ``--out``: an OS error there (a read-only or
    full directory) is a ReglmError naming the directory."""
    try:
        yield
    except OSError as exc:
        raise ReglmError(
            f"cannot write into --out {out} ({exc.strerror or exc}); choose a writable directory"
        ) from None
