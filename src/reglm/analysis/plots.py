"""The embedding-diversity figure (Wang, Gong & Liu 2019, Figure 1) from ``reglm analyze`` records.

One PNG, three panels side by side, one colour per run:

(a) Gaussian KDE of every word's distance to its nearest neighbour in the output embedding;
(b) singular values of the output embedding divided by the largest, log y-scale, against index;
(c) training (dashed) and validation (solid) perplexity per epoch, log y-scale, with epochs
    numbered continuously across the main and fine-tuning stages and a dotted vertical line
    halfway between the last main epoch and the first fine-tuning epoch of each run that has one
    (the legend names that line only when a run has one).

matplotlib is an optional dependency (``pip install 'reglm[analysis]'``): it is imported with
this module, which only the commands that draw figures import, and only when they run, so
``reglm train`` never loads it; without it, importing this module is a
:class:`~reglm.errors.ReglmError` naming the extra, before the command does any work. Figures
are bare ``matplotlib.figure.Figure`` objects (the Agg renderer behind ``savefig``), never
``pyplot``: they work without a display and leave the global backend of an interactive session
alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from reglm.errors import ReglmError
from reglm.io import write_with

try:
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator
except ImportError as exc:
    raise ReglmError(
        f"this command draws figures with matplotlib, which cannot be imported ({exc}); install it with: pip "
        "install 'reglm[analysis]'"
    ) from None


def plot_embedding_diversity(records: list[dict[str, Any]], path: Path | str) -> None:
    """Draw the three panels for ``records`` (from :func:`reglm.analysis.runs.analyze_run`) into
    the PNG ``path`` (:func:`embedding_diversity_figure`), written atomically."""
    fig = embedding_diversity_figure(records)
    write_with(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=110))


def embedding_diversity_figure(records: list[dict[str, Any]]) -> Figure:
    """The three panels for ``records``. Each record needs ``label``, ``kde.grid``/``kde.density``,
    ``singular_values``, ``epochs`` (``global_epoch``, ``train_ppl``, ``valid_ppl``) and
    ``finetune_start_epoch``."""
    fig = Figure(figsize=(16, 4.6), layout="constrained")
    kde_ax, sv_ax, ppl_ax = fig.subplots(1, 3)
    for i, record in enumerate(records):
        colour = f"C{i % 10}"
        kde_ax.plot(record["kde"]["grid"], record["kde"]["density"], color=colour, label=record["label"])
        singular = record["singular_values"]
        sv_ax.plot(range(1, len(singular) + 1), singular, color=colour, label=record["label"])
        x = [e["global_epoch"] for e in record["epochs"]]
        ppl_ax.plot(
            x,
            [e["valid_ppl"] for e in record["epochs"]],
            color=colour,
            linestyle="-",
            marker=".",
            label=record["label"],
        )
        ppl_ax.plot(x, [e["train_ppl"] for e in record["epochs"]], color=colour, linestyle="--", marker=".")
        if record["finetune_start_epoch"] is not None:
            ppl_ax.axvline(record["finetune_start_epoch"] - 0.5, color=colour, linestyle=":", linewidth=1.2)

    kde_ax.set(
        title="(a) Distance to the nearest neighbour (KDE)",
        xlabel="Euclidean distance to nearest neighbour",
        ylabel="density",
    )
    kde_ax.set_ylim(bottom=0)
    sv_ax.set_yscale("log", nonpositive="mask")
    sv_ax.set(title="(b) Normalized singular values (log scale)", xlabel="index", ylabel=r"$\sigma_i / \sigma_1$")
    ppl_ax.set_yscale("log")
    ppl_ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ppl_ax.set(
        title="(c) Training and validation perplexity", xlabel="epoch (main, then fine-tuning)", ylabel="perplexity"
    )
    for ax in (kde_ax, sv_ax):
        ax.legend(title="run")
        ax.grid(True, alpha=0.3)
    ppl_ax.grid(True, which="both", alpha=0.3)
    styles = [
        Line2D([], [], color="0.3", linestyle="-", label="valid"),
        Line2D([], [], color="0.3", linestyle="--", label="train"),
    ]
    if any(record["finetune_start_epoch"] is not None for record in records):
        styles.append(Line2D([], [], color="0.3", linestyle=":", label="fine-tuning starts"))
    run_handles, run_labels = ppl_ax.get_legend_handles_labels()
    ppl_ax.legend(handles=run_handles + styles, labels=run_labels + [h.get_label() for h in styles])
    return fig


def plot_trigram_study(result: dict[str, Any], path: Path | str) -> None:
    """Popov & Kudinov's Figure 1 from :func:`reglm.studies.trigram.run_trigram_study`'s result:
    left, the validation perplexity after every fine-tuning step of the perturbed model (when the
    study logged it); then the chosen word's probability in the fixed context after every step, one
    panel per starting model (perturbed, initial), log y-scale, with the true probability and the
    discriminator's estimate ``p_hat`` as horizontal lines. Written atomically."""
    perturbed = [stage for stage, info in result["stages"].items() if info["base"] == "perturbed"]
    with_valid = any(result["curves"][stage].get("valid", {}).get("step") for stage in perturbed)
    fig = Figure(figsize=(16.5 if with_valid else 11, 4.2), layout="constrained")
    axes = list(fig.subplots(1, 3 if with_valid else 2))
    if with_valid:
        ax = axes.pop(0)
        for stage in perturbed:
            info, curve = result["stages"][stage], result["curves"][stage]["valid"]
            how = "discriminator" if info["objective"] == "reverse-kl" else "cross-entropy"
            ax.plot(curve["step"], curve["ppl"], label=f"{how}, lr {info['lr']:g}")
        ax.set_xlabel("fine-tuning step")
        ax.set_ylabel("validation perplexity (words)")
        ax.set_title("perturbed model: validation perplexity")
        ax.legend(fontsize=8)
    axes[1].sharey(axes[0])
    for ax, base in zip(axes, ("perturbed", "initial")):
        for stage, info in result["stages"].items():
            if info["base"] != base:
                continue
            curve = result["curves"][stage]
            label = (
                f"discriminator, lr {info['lr']:g}"
                if info["objective"] == "reverse-kl"
                else f"cross-entropy, lr {info['lr']:g}"
            )
            ax.plot(curve["step"], curve["prob"], label=label)
        ax.axhline(result["true_prob"], color="black", linestyle="--", linewidth=1, label="true p")
        ax.axhline(
            result["p_hat"][base]["p_hat"], color="grey", linestyle=":", linewidth=1, label="discriminator's p_hat"
        )
        ax.set_yscale("log")
        ax.set_xlabel("fine-tuning step")
        ax.set_title(f"{base} model: p({result['chosen_word']} | fixed context)")
        ax.legend(fontsize=8)
    axes[0].set_ylabel("probability of the chosen word")
    write_with(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=120))


def plot_trigram_figure2(result: dict[str, Any], path: Path | str) -> None:
    """Popov & Kudinov's Figure 2 from :func:`reglm.studies.trigram.run_trigram_study`'s result:
    for each tracked word (an almost frequent and a frequent one by default), its probability in
    its fixed context after every step of each fine-tuning of the perturbed model, with its true
    probability as a horizontal line; one panel per word. Written atomically."""
    ranks = list(result["tracked"])
    fig = Figure(figsize=(5.5 * len(ranks), 4.2), layout="constrained")
    axes = fig.subplots(1, len(ranks), squeeze=False)[0]
    for ax, rank in zip(axes, ranks):
        word = result["tracked"][rank]
        for stage, info in result["stages"].items():
            if info["base"] != "perturbed":
                continue
            curve = result["curves"][stage]["tracked"][rank]
            label = (
                f"discriminator, lr {info['lr']:g}"
                if info["objective"] == "reverse-kl"
                else f"cross-entropy, lr {info['lr']:g}"
            )
            ax.plot(curve["step"], curve["prob"], label=label)
        ax.axhline(word["true_prob"], color="black", linestyle="--", linewidth=1, label="true p")
        kind = "frequent" if int(rank) <= 50 else "almost frequent" if int(rank) <= 150 else "rare"
        ax.set_title(f"{kind} word {word['word']} (rank {rank}): p(word | its fixed context)")
        ax.set_xlabel("fine-tuning step (perturbed model)")
        ax.legend(fontsize=8)
    axes[0].set_ylabel("probability")
    write_with(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=120))


def plot_subspace_study(result: dict[str, Any], path: Path | str) -> None:
    """Figure 1 of the paper from a :func:`reglm.studies.subspace.run_subspace_study` result, as the PNG ``path``
    (written atomically).

    (a) subspace distance against ``beta`` at ``tau = tau_a``; (b) against ``tau`` at ``beta = 1``;
    mean over runs with standard-deviation error bars. A bare matplotlib ``Figure`` (Agg), as
    :mod:`reglm.analysis.plots`.
    """
    runs = result["spec"]["runs"]
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    beta_ax, tau_ax = fig.subplots(1, 2)
    for ax, key, colour in ((beta_ax, "beta", "C0"), (tau_ax, "tau", "C1")):
        data = result["panels"][key]
        ax.errorbar(data["x"], data["mean"], yerr=data["std"], color=colour, marker="o", capsize=4, linewidth=1.5)
        ax.set_ylim(0.0, 1.02)
        ax.grid(True, alpha=0.3)
    beta_ax.set(
        title=rf"(a) Subspace distance at $\tau$ = {result['panels']['beta']['tau']:g}"
        "\n"
        r"for different proportions of $J^{aug}$",
        xlabel=r"Proportion of augmented loss ($\beta$)",
        ylabel="Normalized distance",
    )
    tau_ax.set(
        title="(b) Subspace distance at different temperatures\n" r"when only $J^{aug}$ is used ($\beta$ = 1)",
        xlabel=r"Temperature ($\tau$)",
        ylabel="Normalized distance",
    )
    fig.suptitle(
        rf"Distance between span($L^T$) and span($W$) (Inan et al. 2017, Fig. 1); mean $\pm$ std over {runs} run(s)"
    )
    write_with(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=110))


def plot_loss_by_frequency(records: list[dict[str, Any]], path: Path | str) -> None:
    """Baevski & Auli's Figures 2 and 3 from :func:`reglm.analysis.frequency.frequency_analysis`
    records (each with a ``label``): (a) the mean loss of the targets in each decade of training
    frequency, (b) binned by the previous word's frequency; one bar per run in every bin (an empty
    bin has none). Written atomically."""
    fig = Figure(figsize=(13, 4.4), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    width = 0.8 / max(len(records), 1)
    panels = (
        ("by_frequency", "(a) Loss by word frequency", "word frequency bin"),
        ("by_previous_frequency", "(b) Loss by the previous word's frequency", "previous word frequency bin"),
    )
    for ax, (key, title, xlabel) in zip(axes, panels):
        labels = records[0][key]["bins"] if records else []
        for i, record in enumerate(records):
            means = record[key]["mean_loss"]
            xs = [b + (i - (len(records) - 1) / 2) * width for b, m in enumerate(means) if m is not None]
            ax.bar(xs, [m for m in means if m is not None], width=width, color=f"C{i % 10}", label=record["label"])
        ax.set_xticks(range(len(labels)), labels)
        ax.set(title=title, xlabel=f"{xlabel} (training count, decades; not cumulative)")
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(title="run")
    axes[0].set_ylabel("mean loss on the next word (nats)")
    write_with(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=110))
