"""``reglm reproduce popov:1``: Popov & Kudinov's Table 1 and Figures 1-2, the synthetic study.

The table is not a set of preset rows but one chain of runs -- the initial model, the perturbed
model, a discriminator for each, and their fine-tunings -- which :mod:`reglm.studies.trigram`
trains (resumably) into ``OUT/study/``. This module sizes the study by ``--scale`` and
``--budget``, runs it, and writes ``table.md`` and ``table.json`` with the paper's numbers beside
the study's, and the figures' paths relative to ``OUT`` (drawn by the study from the same runs).

* ``--scale full``: appendix A -- 80k / 10k / 10k sentences, a 2-layer LSTM of 256 units and
  embedding, batches of 1,024 sentences (streams), SGD at lr 1.0, clipping 1.0, the rate ×0.1 on
  every epoch that does not improve validation, no regularization; the study's defaults.
* ``--scale reduced``: the units and the sentences divided by
  :data:`~reglm.reproduce.plan.WIDTH_FACTOR`, the streams by its square, the epochs (initial model,
  discriminators) by :data:`~reglm.reproduce.plan.EPOCH_FACTOR`.
* ``--budget E`` caps every stage at ``E`` epochs; ``--minutes`` and ``--rows`` do not apply (the
  rows are made together).
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any

from reglm.errors import ReglmError
from reglm.io import write_json, write_text
from reglm.reproduce.plan import EPOCH_FACTOR, WIDTH_FACTOR, Budget
from reglm.reproduce.runs import claim_out, new_manifest, say
from reglm.reproduce.table import command_line

STUDY = "study"

PAPER_ROWS: dict[str, tuple[str, tuple[float, ...]]] = {
    "true distribution": ("True distribution p", (78.14, 29.74, 766.53, 25.8)),
    "initial model": ("Initial model", (84.89, 31.27, 899.76, 28.8, -0.083, 0.445)),
    "ftd-initial": ("Initial model ftd.", (84.88, 31.30, 897.30, 28.7, -0.083, 0.445)),
    "perturbed model": ("Perturbed model", (86.01, 31.24, 942.71, 30.2, -0.096, 0.591)),
    "ftd-perturbed": ("Perturbed model ftd.", (85.63, 31.27, 926.78, 29.6, -0.092, 0.521)),
}
"""Table 1 (test perplexity, frequent, rare, ratio, mean and std of log q - log p), by the study's row names."""
PAPER_EXCEPT_CHOSEN = 84.56
"""Section 3: the perturbed model fine-tuned with the discriminator, over every word but the chosen one."""
COLUMNS = ("test_ppl", "frequent_ppl", "rare_ppl", "ratio", "logq_minus_logp_mean", "logq_minus_logp_std")


def study_spec(scale: str, budget: Budget, options: list[str]) -> Any:
    """The :class:`~reglm.studies.trigram.TrigramStudySpec` of ``--scale`` and ``--budget``;
    ``options`` (``data.data_dir=``, ``train.device=``) go to every run."""
    from reglm.studies.trigram import TrigramStudySpec

    if budget.minutes is not None:
        raise ReglmError(
            "popov:1 is one chain of runs (the synthetic study); give --budget EPOCHS instead of --minutes"
        )
    spec = TrigramStudySpec(extra=tuple(options))
    if scale == "reduced":
        spec = replace(
            spec,
            sentences=spec.sentences // WIDTH_FACTOR,
            hidden=spec.hidden // WIDTH_FACTOR,
            batch_size=spec.batch_size // WIDTH_FACTOR**2,
            epochs=max(1, spec.epochs // EPOCH_FACTOR),
            disc_epochs=max(1, spec.disc_epochs // EPOCH_FACTOR),
        )
    if budget.epochs is not None:
        spec = replace(
            spec,
            epochs=min(spec.epochs, budget.epochs),
            disc_epochs=min(spec.disc_epochs, budget.epochs),
            finetune_epochs=min(spec.finetune_epochs, budget.epochs),
        )
    return spec


def reproduce_trigram(
    out: Path,
    rows: list[str] | None,
    scale: str,
    budget: Budget,
    options: list[str],
    progress: bool,
    stop: Any = None,
) -> tuple[dict[str, Any], str]:
    """Run (or resume) the study in ``out/study`` and write ``out/table.md`` and ``out/table.json``;
    returns ``(table.json's content, table.md's)``."""
    from reglm.studies.trigram import run_trigram_study

    if rows:
        raise ReglmError(
            "popov:1's rows come from one chain of runs (the synthetic study) and are made together; leave out --rows"
        )
    spec = study_spec(scale, budget, options)
    manifest = new_manifest("popov", "1", scale, budget, options)
    claim_out(out, manifest)
    say(
        f"popov:1: the synthetic study in {out / STUDY} "
        f"({spec.sentences} sentences, {spec.hidden} units, {spec.batch_size} streams)"
    )
    result = run_trigram_study(out / STUDY, spec, progress, stop)
    meta = {
        **manifest,
        "command": command_line("popov:1", None, scale, budget, options),
        "minutes": result["seconds"] / 60,
        "study": f"{STUDY}/trigram-study.json",
        "figures": [f"{STUDY}/trigram-study.png", f"{STUDY}/trigram-study-figure2.png"],
    }
    table = {
        **meta,
        "chosen_word": result["chosen_word"],
        "chosen_rank": result["chosen_rank"],
        "rows": _records(result["table"]),
    }
    markdown = render(table)
    write_json(out / "table.json", table)
    write_text(out / "table.md", markdown)
    return table, markdown


def _records(rows: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    """The rows in the paper's order, then the cross-entropy fine-tunings (no paper numbers)."""
    records = []
    for name in [n for n in PAPER_ROWS if n in rows] + [n for n in rows if n not in PAPER_ROWS]:
        row = rows[name]
        label, paper = PAPER_ROWS[name] if name in PAPER_ROWS else (_label(name), ())
        record = {
            "id": name,
            "row": label,
            "reglm": {c: row[c] for c in COLUMNS if c in row},
            "paper": dict(zip(COLUMNS, paper)),
        }
        if "ppl_except_chosen" in row:
            record["reglm"]["ppl_except_chosen"] = row["ppl_except_chosen"]
        if name == "ftd-perturbed":
            record["paper"]["ppl_except_chosen"] = PAPER_EXCEPT_CHOSEN
        records.append(record)
    return records


def _label(name: str) -> str:
    """``ce-0.1-perturbed`` -> ``Perturbed model, cross-entropy fine-tuning at lr 0.1``."""
    _, lr, base = name.split("-", 2)
    return f"{base.capitalize()} model, cross-entropy fine-tuning at lr {lr}"


def _cell(record: dict[str, Any], column: str, digits: int) -> str:
    ours, paper = record["reglm"].get(column), record["paper"].get(column)
    if ours is None:
        return ""
    return f"{ours:.{digits}f}" + (f" ({paper:.{digits}f})" if paper is not None else "")


def render(table: dict[str, Any]) -> str:
    """``table.md``: Table 1 with the paper's numbers in parentheses, then section 3's figures."""
    lines = [
        "# popov:1: Popov & Kudinov 2019, Table 1 (fine-tuning results on synthetic data)",
        "",
        f"`{table['command']}` (its last invocation: {table['minutes']:.1f} min; finished stages are reused).",
        "reglm's numbers, the paper's in parentheses; perplexities over the test words; frequent: the 50 most",
        f"frequent training words. Chosen word: {table['chosen_word']} (frequency rank {table['chosen_rank']}).",
        "",
        "| model | test ppl | frequent ppl | rare ppl | ratio | log q − log p |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for record in table["rows"]:
        diff = ""
        if "logq_minus_logp_mean" in record["reglm"]:
            ours, paper = record["reglm"], record["paper"]
            diff = f"{ours['logq_minus_logp_mean']:+.3f} ± {ours['logq_minus_logp_std']:.3f}"
            if "logq_minus_logp_mean" in paper:
                diff += f" ({paper['logq_minus_logp_mean']:+.3f} ± {paper['logq_minus_logp_std']:.3f})"
        cells = [
            _cell(record, "test_ppl", 2),
            _cell(record, "frequent_ppl", 2),
            _cell(record, "rare_ppl", 2),
            _cell(record, "ratio", 1),
            diff,
        ]
        lines.append(f"| {record['row']} | " + " | ".join(cells) + " |")
    by_id = {record["id"]: record for record in table["rows"]}
    lines.append("")
    true_ppl, initial = by_id["true distribution"]["reglm"]["test_ppl"], by_id["initial model"]["reglm"]["test_ppl"]
    lines.append(
        f"- initial model / true distribution, test perplexity: {initial / true_ppl:.3f} (paper: {84.89 / 78.14:.3f})"
    )
    tuned = by_id["ftd-perturbed"]["reglm"].get("ppl_except_chosen")
    if tuned is not None and math.isfinite(tuned):
        lines.append(
            "- perturbed model fine-tuned with the discriminator, every word but the chosen one: "
            f"{tuned:.2f} (paper: {PAPER_EXCEPT_CHOSEN})"
        )
    lines.append(f"- Figure 1 (validation perplexity, the chosen word's probability per step): `{table['figures'][0]}`")
    lines.append(f"- Figure 2 (an almost frequent and a frequent word's probability per step): `{table['figures'][1]}`")
    return "\n".join(lines) + "\n"
