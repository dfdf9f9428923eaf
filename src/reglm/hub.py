"""Hugging Face conventions: ``save_pretrained`` / ``from_pretrained`` directories and the Hub.

A reglm model directory (a run's ``best/`` or ``last/``, :mod:`reglm.modeldir`) already has
the layout of a Hugging Face pretrained directory -- ``config.json`` (the run configuration plus
the vocabulary's size and fingerprint), ``model.safetensors`` (a tied matrix stored once),
``vocab.txt`` and, for a BPE model, ``tokenizer.json`` (Hugging Face ``tokenizers`` format) -- so
these functions are thin:

* :func:`save_pretrained` (``TrainedModel.save_pretrained(path)``) writes that directory;
* :func:`pretrained_directory` (read by ``reglm.from_pretrained(path_or_repo_id)``) is a local run
  or model directory, or the download of a Hub repository holding one
  (``huggingface_hub.snapshot_download``);
* :func:`push_to_hub` (``TrainedModel.push_to_hub(repo_id)``) uploads the directory to a Hub
  repository, creating it if needed.

The Hub functions need the ``hub`` extra (``pip install 'reglm[hub]'``); directories do not.
"""

from __future__ import annotations

import dataclasses
import re
import tempfile
from pathlib import Path
from typing import Any

from reglm.config import RunConfig
from reglm.config.schema import DataConfig
from reglm.errors import ReglmError
from reglm.modeldir import save_model_dir
from reglm.rundir import CONFIG_FILE, MODEL_FILE, TOKENIZER_FILE, VOCAB_FILE, model_dir

FILES = [CONFIG_FILE, MODEL_FILE, VOCAB_FILE, TOKENIZER_FILE]
"""What a pretrained directory holds (``tokenizer.json`` for BPE models only)."""
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
INSTALL = "install the hub extra: pip install 'reglm[hub]'"


def _check_target(path: Path, overwrite: bool) -> None:
    if path.exists() and not path.is_dir():
        raise ReglmError(f"{path} is a file, not a directory; choose another path for save_pretrained")
    if path.is_dir() and any(path.iterdir()):
        if not (path / MODEL_FILE).is_file():
            raise ReglmError(
                f"{path} is a directory that is not empty and holds no reglm model ({MODEL_FILE}); "
                "choose a new or empty directory"
            )
        if not overwrite:
            raise ReglmError(f"{path} already holds a model; choose a new or empty directory, or pass overwrite=True")


def save_pretrained(lm: Any, path: Path | str, overwrite: bool = False) -> Path:
    """Write ``lm`` (a :class:`~reglm.api.TrainedModel`) as a model directory at ``path``, which
    must be new or empty, or, with ``overwrite``, a model directory (replaced file by file, each
    atomically).

    The run configuration is the one ``lm`` was loaded with (``lm.run_config``, set by
    :func:`from_pretrained` and :func:`reglm.load`); a model without one (built by hand) gets
    its own model section with the defaults of every other section, as ``config.json`` says
    (``info.run_config``), so ``reglm eval`` on it needs ``--data``."""
    path = Path(path)
    _check_target(path, overwrite)
    config = lm.run_config
    info: dict[str, Any] = {"saved_by": "save_pretrained", "run_config": "the run's"}
    if config is None:
        data = DataConfig(name="unknown", tokenizer="bpe" if lm.subword is not None else "word")
        config = dataclasses.replace(RunConfig(), data=data, model=lm.model.cfg)
        info["run_config"] = (
            "unknown: the model section is the model's, every other section is a default (data.name=unknown)"
        )
    save_model_dir(path, lm.model, config, lm.vocab, info)
    return path


def _hub() -> Any:
    try:
        import huggingface_hub
    except ImportError:
        raise ReglmError(f"the Hugging Face Hub needs the huggingface_hub package; {INSTALL}") from None
    return huggingface_hub


def _short(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:200] if lines else type(exc).__name__


def _download(repo_id: str, revision: str | None, token: str | None) -> Path:
    if not REPO_ID.match(repo_id):
        raise ReglmError(
            f"{repo_id} does not exist; give a run directory, a model directory or a Hugging Face Hub repo id "
            "(user/name)"
        )
    try:
        hub = _hub()
    except ReglmError:
        raise ReglmError(
            f"{repo_id} is not a local directory; to download it from the Hugging Face Hub, {INSTALL}"
        ) from None
    try:
        return Path(hub.snapshot_download(repo_id, revision=revision, token=token, allow_patterns=FILES))
    except Exception as exc:  # huggingface_hub raises many types (HTTP, offline, not found); all mean the same here
        raise ReglmError(
            f"{repo_id} is not a local directory and could not be downloaded from the Hugging Face Hub "
            f"({_short(exc)}); "
            "check the path or the repo id, the network and the token"
        ) from None


def pretrained_directory(
    path_or_repo_id: Path | str, which: str = "best", revision: str | None = None, token: str | None = None
) -> Path:
    """The model directory :func:`reglm.from_pretrained` loads: the ``which`` model of a local run
    directory, a model directory, or the download of a Hugging Face Hub repository holding one
    (``revision``: a branch, tag or commit; ``token``: for a private repository)."""
    local = Path(path_or_repo_id)
    return model_dir(local, which) if local.exists() else _download(str(path_or_repo_id), revision, token)


def push_to_hub(
    lm: Any,
    repo_id: str,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str = "Upload reglm model",
) -> str:
    """Upload ``lm``'s :func:`save_pretrained` directory to the Hub repository ``repo_id`` (created
    when missing; ``private`` for a new one); returns the commit's URL."""
    if not REPO_ID.match(repo_id):
        raise ReglmError(f"{repo_id!r} is not a Hugging Face Hub repo id; give user/name")
    api = _hub().HfApi(token=token)
    with tempfile.TemporaryDirectory() as folder:
        save_pretrained(lm, folder)
        try:
            api.create_repo(repo_id, private=private, exist_ok=True)
            commit = api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message)
        except Exception as exc:  # as in _download: network, authentication and HTTP errors alike
            raise ReglmError(
                f"uploading to the Hugging Face Hub repo {repo_id} failed ({_short(exc)}); check the network and "
                "the token (huggingface-cli login)"
            ) from None
    return str(getattr(commit, "commit_url", commit))
