"""Scoring a reproduction's rows as their metadata says (plain, cache, dynamic evaluation, next
words; the final or the main-stage model), and the record of each row in ``table.json``."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from reglm.config import RunConfig
from reglm.evaluate.modes import MODES
from reglm.io import write_json
from reglm.papers import PAPERS
from reglm.reproduce.plan import ROWS, RowPlan, Run, run_chain
from reglm.reproduce.runs import say
from reglm.rundir import ENVIRONMENT_FILE, METRICS_FILE, RESULTS_FILE


def epochs_trained(run_dir: Path) -> dict[str, int]:
    """Epochs trained per stage, from the run's ``metrics.jsonl``."""
    counts = {"main": 0, "finetune": 0}
    path = run_dir / METRICS_FILE
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            if record.get("event") == "epoch":
                counts[record.get("stage", "main")] = counts.get(record.get("stage", "main"), 0) + 1
    return counts


def device_of(run_dir: Path) -> str | None:
    try:
        sessions = json.loads((run_dir / ENVIRONMENT_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    last = sessions[-1] if isinstance(sessions, list) and sessions else {}
    device = last.get("device")
    if device is None:
        return None
    return (
        f"{device} ({last['gpu']})"
        if last.get("gpu")
        else f"{device} ({last.get('cpu_count')} cores, {last.get('torch_threads')} threads)"
    )


class Scorer:
    """Scores rows on their runs' models, loading each model and corpus once."""

    def __init__(self, progress: bool = False) -> None:
        self.progress = progress
        self._corpora: dict[Any, Any] = {}

    def corpus(self, config: RunConfig) -> Any:
        from reglm.data import load_corpus

        if config.data not in self._corpora:
            self._corpora[config.data] = load_corpus(config)
        return self._corpora[config.data]

    def score(self, plan: RowPlan) -> dict[str, Any]:
        """``{"valid", "test", "params", ...}`` of ``plan``'s row on its run's model."""
        run, row = plan.run, plan.row
        best = run.directory / "best"
        if not best.is_dir():
            return {"missing": "no trained model (the run's time budget ended before its first epoch)"}
        results = read_json(run.directory / RESULTS_FILE)
        if row.evaluation == "plain" and results is not None and "missing" not in results:
            record = results.get("main") if plan.stage == "main" else results
            if record is None:
                return {"missing": "the run recorded no main-stage scores"}
            out = {"valid": record["valid"]["ppl"], "test": record["test"]["ppl"]}
        else:
            out = self._measure(plan)
        from reglm.modeldir import load_model_dir

        model, _, _ = load_model_dir(best)
        return {**out, "params": model.num_parameters()}

    def _run_mode(
        self, plan: RowPlan, model: Any, config: RunConfig, vocab: Any, corpus: Any, device: Any
    ) -> dict[str, Any]:
        """Valid and test perplexity of ``plan``'s row by its evaluation mode (a search tunes on
        valid once and scores its choice on test), with the setting scored."""
        from reglm.data.batchings import eval_block, eval_reading
        from reglm.evaluate.modes import EvalContext, batch_size_for, reading_for

        row = plan.row
        mode = MODES[row.evaluation]
        setting = mode.parse(row.spec or "", f"preset {row.preset}: paper.spec")
        splits = ("test",) if mode.searches else ("valid", "test")
        memo: dict[str, Any] = {}
        outcomes = {}
        for split in splits:
            batch_size = batch_size_for(mode, setting, config.train.batching, split)
            run_reading = eval_reading(config.train.batching, split, vocab.eos_id)
            reading = reading_for(mode, run_reading, eval_block(config.train.batching), vocab.eos_id, batch_size)
            ctx = EvalContext(
                model,
                getattr(corpus, split),
                split,
                batch_size,
                reading.bptt,
                reading,
                corpus.split_word_ends(split),
                device,
                False,
                self.progress,
                corpus.valid,
                corpus.train,
                memo,
            )
            outcomes[split] = mode.run(ctx, setting)
        test = outcomes["test"]
        valid = test.tuned_ppl if mode.searches else outcomes["valid"].result.ppl
        out = {"valid": valid, "test": test.result.ppl}
        return {**out, "setting": test.setting} if test.setting else out

    def _measure(self, plan: RowPlan) -> dict[str, Any]:
        import torch

        from reglm.devices import resolve_device
        from reglm.modeldir import load_model_dir

        row, run = plan.row, plan.run
        device = resolve_device(run.config.train.device)
        model, config, vocab = load_model_dir(run.directory / "best", device)
        corpus = self.corpus(config)
        if row.evaluation == "plain":
            from reglm.train.results import main_stage_record

            record = main_stage_record(run.directory) if plan.stage == "main" else None
            if record is not None:
                return {
                    "valid": record["valid"]["ppl"],
                    "test": record["test"]["ppl"],
                    "note": "time budget spent in the fine-tuning stage: its main-stage record",
                }
            scores = self._run_mode(plan, model, config, vocab, corpus, device)
            return {**scores, "note": "time budget spent: the best model so far"}
        if row.evaluation in MODES:
            return self._run_mode(plan, model, config, vocab, corpus, device)
        from reglm.api import load

        lm = load(run.directory / "best", device=device)
        table = PAPERS[row.paper].tables[row.table]
        with torch.no_grad():
            top = [
                ", ".join(f"{word} {math.exp(logp):.2f}" for word, logp in lm.next_words(phrase, 10, exclude=()))
                for phrase in table.phrases
            ]
        return {"top10": top}


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def score_rows(out: Path, plans: list[RowPlan], ledger: dict[str, Any], progress: bool = False) -> list[dict[str, Any]]:
    """Every row's record (cached in ``out/rows/ID.json`` while its run is unchanged)."""
    scorer = Scorer(progress)
    records = []
    for plan in plans:
        run, row = plan.run, plan.row
        path = Path(out) / ROWS / f"{row.id}.json"
        entry = ledger.get(run.name, {})
        fingerprint = {
            "run": run.name,
            "stage": plan.stage,
            "evaluation": row.evaluation,
            "spec": row.spec,
            "status": entry.get("status"),
            "epochs": epochs_trained(run.directory),
        }
        cached = read_json(path)
        if cached is not None and cached.get("fingerprint") == fingerprint:
            ours = cached["ours"]
        else:
            if entry.get("status") in ("done", "budget"):
                say(f"scoring row {row.id} ({row.evaluation}, {plan.stage} model of {run.name})")
            ours = _not_trained(entry) or scorer.score(plan)
            write_json(path, {"fingerprint": fingerprint, "ours": ours})
        records.append(row_record(plan, ours, ledger))
    return records


def _not_trained(entry: dict[str, Any]) -> dict[str, Any] | None:
    status = entry.get("status")
    if status == "blocked":
        return {"missing": "not trained: the run it starts from has no model"}
    if status not in ("done", "budget"):
        return {"missing": "not trained"}
    return None


def _minutes(ledger: dict[str, Any], run: Run) -> float:
    return round(ledger.get(run.name, {}).get("seconds", 0.0) / 60, 2)


def _earlier_runs(run: Run, ledger: dict[str, Any]) -> list[dict[str, Any]]:
    """The runs ``run`` starts from (recursively, in training order): epochs, minutes, and the
    validation and test perplexity of their best model when they have one."""
    out = []
    for need in {need.name: need for need in run_chain(run)[:-1]}.values():
        results = read_json(need.directory / RESULTS_FILE) or {}
        ppl = {split: results.get(split, {}).get("ppl") for split in ("valid", "test")}
        out.append(
            {"run": need.name, "epochs": epochs_trained(need.directory), "minutes": _minutes(ledger, need), **ppl}
        )
    return out


def row_record(plan: RowPlan, ours: dict[str, Any], ledger: dict[str, Any]) -> dict[str, Any]:
    row, run = plan.row, plan.run
    t = run.config.train
    rep = row.reported
    entry = ledger.get(run.name, {})
    earlier = _earlier_runs(run, ledger)
    return {
        "id": row.id,
        "row": row.row,
        "preset": row.preset,
        "run": run.name,
        "starts_from": [need.name for need in run.needs],
        "evaluation": row.evaluation,
        "stage": plan.stage,
        "spec": row.spec,
        "note": row.note,
        "paper": {
            "valid": rep.valid,
            "test": rep.test,
            "params": rep.params,
            "params_count": rep.params_count,
            **({"top10": list(rep.top10)} if rep.top10 else {}),
        },
        "reglm": {**ours, "params_full_scale": plan.full_params},
        "budget": {
            "planned_epochs": {"main": t.epochs, "finetune": t.finetune.epochs if t.finetune.enabled else 0},
            "epochs": epochs_trained(run.directory),
            "minutes": _minutes(ledger, run),
            "minutes_with_earlier_runs": round(_minutes(ledger, run) + sum(item["minutes"] for item in earlier), 2),
            "earlier_runs": earlier,
            "status": entry.get("status"),
            "device": device_of(run.directory),
        },
    }
