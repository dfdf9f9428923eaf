"""``table.md``: a reproduction's rows, the paper's numbers beside reglm's, with the budget used."""

from __future__ import annotations

from typing import Any

from reglm.papers import PAPERS
from reglm.reproduce.plan import Budget


def _num(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _printed(value: float | None) -> str:
    """A paper's number as it prints it (60.0, 163.19)."""
    return "–" if value is None else f"{value:.1f}" if round(value, 1) == value else f"{value:.2f}"


def _cell(text: str) -> str:
    """``text`` safe in a Markdown table cell (``<unk>`` is no HTML tag)."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("|", "\\|")


def _params(value: int | str | None) -> str:
    if value is None:
        return "–"
    return value if isinstance(value, str) else f"{value / 1e6:.2f}M"


def render_markdown(meta: dict[str, Any], records: list[dict[str, Any]]) -> str:
    """``table.md``: the settings, then one line per row, the paper's numbers beside reglm's."""
    paper, table = meta["table"].split(":")
    entry = PAPERS[paper].tables[table]
    budget = meta["budget"]
    lines = [
        f"# {PAPERS[paper].citation}: {'Table ' + table if table.isdigit() else table}",
        "",
        f"{entry.caption[0].upper()}{entry.caption[1:]}.",
        "",
        f"`{meta['command']}`: scale **{meta['scale']}**"
        + (f", at most {budget['epochs']} epoch(s) per stage" if budget["epochs"] else "")
        + (
            f", {budget['minutes']:g} {'minute' if budget['minutes'] == 1 else 'minutes'} for the table"
            if budget["minutes"]
            else ""
        )
        + f"; {meta['minutes']:.1f} minutes of training in all ({meta['runs']} "
        f"run{'' if meta['runs'] == 1 else 's'}) on {', '.join(meta['devices']) or 'no device'}.",
        "",
    ]
    if entry.phrases:
        for record in records:
            lines += [
                f"## {record['row']} (`{record['preset']}`)",
                "",
                "| phrase | paper's top 10 | reglm's top 10 |",
                "|---|---|---|",
            ]
            ours = record["reglm"].get("top10") or ["–"] * len(entry.phrases)
            for phrase, theirs, mine in zip(entry.phrases, record["paper"]["top10"], ours):
                lines.append(f"| {_cell(phrase)} | {_cell(theirs)} | {_cell(mine)} |")
            lines += ["", _budget_line(record), ""]
        return "\n".join(lines) + "\n"
    lines += [
        "| row | paper valid | paper test | reglm valid | reglm test | paper params | reglm params (full / "
        "trained) | evaluated | epochs (main+ft) | minutes | device |",
        "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---|",
    ]
    notes = []
    for record in records:
        ours, theirs, budget = record["reglm"], record["paper"], record["budget"]
        evaluated = (
            f"{record['evaluation']}"
            + (f" {ours['setting']}" if ours.get("setting") else "")
            + (", main stage" if record["stage"] == "main" else "")
        )
        epochs = f"{budget['epochs']['main']}+{budget['epochs']['finetune']}"
        lines.append(
            f"| {_cell(record['row'])} (`{record['id']}`) | {_printed(theirs['valid'])} | "
            f"{_printed(theirs['test'])} | {_num(ours.get('valid'))} | {_num(ours.get('test'))} "
            f"| {theirs['params'] or '–'} | {_params(ours.get('params_full_scale'))} / "
            f"{_params(ours.get('params'))} | {evaluated} | {epochs} "
            f"| {budget['minutes_with_earlier_runs']:.1f} | {budget['device'] or '–'} |"
        )
        for text in (ours.get("missing"), ours.get("note"), record["note"]):
            if text:
                notes.append(f"- `{record['id']}`: {_cell(text)}")
        if budget["earlier_runs"]:
            chain = "; ".join(
                f"`{item['run']}` ({item['epochs']['main']}+{item['epochs']['finetune']} epochs, "
                f"{item['minutes']:.1f} min"
                + (
                    f", valid {item['valid']:.2f} / test {item['test']:.2f}"
                    if item["valid"] is not None and item["test"] is not None
                    else ""
                )
                + ")"
                for item in budget["earlier_runs"]
            )
            notes.append(
                f"- `{record['id']}`: run `{record['run']}` starts from {chain}; the minutes column counts them"
            )
    if notes:
        lines += ["", *notes]
    return "\n".join(lines) + "\n"


def _budget_line(record: dict[str, Any]) -> str:
    budget = record["budget"]
    return (
        f"Run `{record['run']}`: {budget['epochs']['main']}+{budget['epochs']['finetune']} epochs, "
        f"{budget['minutes']:.1f} minutes on {budget['device'] or '–'}."
    )


def command_line(target: str, rows: list[str] | None, scale: str, budget: Budget, options: list[str]) -> str:
    """The ``reglm reproduce`` command line that makes (or resumes) this table."""
    flags = {"data.data_dir": "--data-dir", "train.device": "--device"}
    words = ["reglm reproduce", target, *(["--rows", ",".join(rows)] if rows else []), "--scale", scale]
    words += (
        ["--budget", str(budget.epochs)]
        if budget.epochs
        else ["--minutes", f"{budget.minutes:g}"]
        if budget.minutes
        else []
    )
    for option in options:
        key, _, value = option.partition("=")
        words += [flags[key], value] if key in flags else [option]
    return " ".join(words)
