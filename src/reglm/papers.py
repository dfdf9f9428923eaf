"""The papers reglm reproduces and their tables: what ``paper:`` metadata in a preset may name.

A preset's ``paper:`` block (:mod:`reglm.config.presets`) says which row of which table its run
reproduces; this module holds the tables themselves: each paper's citation and, per table, its
caption and, where reglm cannot produce the table's numbers, the technique it lacks (``reglm
reproduce`` refuses such a table, naming it). Keys are short, for the command line
(``reglm reproduce inan:1``). Nothing here imports PyTorch.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Table:
    caption: str
    rows: tuple[str, ...] = ()
    """the ids of the table's rows, in the paper's order (each claimed by one preset's metadata)"""
    missing: str | None = None
    """the technique reglm lacks to produce this table's numbers (the table is refused), or None"""
    study: str | None = None
    """the study (``reglm study NAME``) whose chain of runs makes the table, instead of preset rows"""
    phrases: tuple[str, ...] = ()
    """next-words tables: the phrases whose next words the rows predict"""


@dataclass(frozen=True)
class Paper:
    citation: str
    text: str
    """the paper's text in ``shared/papers/``, against which every reported number was checked"""
    tables: dict[str, Table] = field(default_factory=dict)


MODELS = ("vd", "al", "re", "real")
"""Inan et al.'s four models: VD-LSTM, +AL (augmented loss), +RE (reused embeddings), +REAL (both)."""

PAPERS: dict[str, Paper] = {
    "merity": Paper(
        "Merity, Keskar & Socher 2018, Regularizing and Optimizing LSTM Language Models (ICLR)",
        "awd-lstm_merity-keskar-socher-2017.md",
        {
            "1": Table(
                "single-model perplexity on Penn Treebank (own rows: AWD-LSTM, + continuous cache pointer)",
                ("awd-lstm", "awd-lstm-cache"),
            ),
            "2": Table(
                "single-model perplexity on WikiText-2 (own rows: AWD-LSTM, + continuous cache pointer)",
                ("awd-lstm", "awd-lstm-cache"),
            ),
            "3": Table(
                "summed loss change per word when the cache is added (WikiText-2 validation)",
                missing="a per-word table, not a perplexity one: write it with `reglm eval RUN --cache "
                "window=3785,theta=0.662,lambda=0.1279 --cache-deltas FILE` on a trained awd-lstm-wt2 run",
            ),
            "4": Table(
                "model ablations on Penn Treebank and WikiText-2",
                (
                    "ptb-awd-lstm",
                    "ptb-no-finetune",
                    "ptb-no-ntasgd",
                    "ptb-no-variable-bptt",
                    "ptb-no-embed-dropout",
                    "ptb-no-weight-decay",
                    "ptb-no-ar-tar",
                    "ptb-full-size-embedding",
                    "ptb-no-weight-drop",
                )
                + (
                    "wt2-awd-lstm",
                    "wt2-no-finetune",
                    "wt2-no-ntasgd",
                    "wt2-no-variable-bptt",
                    "wt2-no-embed-dropout",
                    "wt2-no-weight-decay",
                    "wt2-no-ar-tar",
                    "wt2-full-size-embedding",
                    "wt2-no-weight-drop",
                ),
            ),
        },
    ),
    "inan": Paper(
        "Inan, Khosravi & Socher 2017, Tying Word Vectors and Word Classifiers: A Loss Framework for Language "
        "Modeling (ICLR)",
        "tying-augmented-loss_inan-khosravi-socher-2017.txt",
        {
            "1": Table(
                "the four models at three sizes on Penn Treebank and WikiText-2 (PTB small: re-trained from the "
                "first session's final weights, footnote 4)",
                tuple(
                    f"{data}-{size}-{model}"
                    for data, sizes in (("ptb", ("small", "medium", "large")), ("wt2", ("small", "medium")))
                    for size in sizes
                    for model in MODELS
                ),
            ),
            "2": Table(
                "the four small models trained on each half of the WikiText-2 training set, with the full vocabulary",
                tuple(f"part{part}-{model}" for part in (1, 2) for model in MODELS),
            ),
            "3": Table(
                "comparison with previous work on Penn Treebank (own row: VD-LSTM +REAL large)", ("vd-lstm-real-large",)
            ),
            "4": Table(
                "top-10 next-word predictions of the large VD-LSTM and VD-LSTM +REAL after phrases of the PTB test set",
                ("vd-lstm-large", "vd-lstm-real-large"),
                phrases=(
                    "information international said it believes that the complaints filed in",
                    "oil company refineries ran flat out to prepare for a robust holiday driving season in july and",
                    "southmark said it plans to <unk> its <unk> to provide financial results as soon as its audit is",
                    "merieux said the government 's minister of industry science and",
                ),
            ),
        },
    ),
    "popov": Paper(
        "Popov & Kudinov 2019, Fine-tuning of Language Models with Discriminator",
        "discriminator-finetuning_popov-kudinov-2019.md",
        {
            "1": Table(
                "fine-tuning results on synthetic data (and Figures 1-2)",
                study="trigram",
            ),
            "2": Table(
                "quality after fine-tuning the DOC model on Penn Treebank",
                ("initial", "no-dropout-disc", "dropout-disc", "no-dropout-no-disc", "dropout-no-disc"),
            ),
            "3": Table(
                "perplexity of MoS and DOC, trained, fine-tuned with the discriminator and with dynamic "
                "evaluation, on PTB and WikiText-2",
                (
                    "ptb-mos-original",
                    "ptb-mos-ours",
                    "ptb-mos-finetuned",
                    "ptb-mos-original-dynamic",
                    "ptb-mos-finetuned-dynamic",
                    "ptb-doc-original",
                    "ptb-doc-ours",
                    "ptb-doc-finetuned",
                )
                + (
                    "wt2-mos-original",
                    "wt2-mos-ours",
                    "wt2-mos-finetuned",
                    "wt2-mos-original-dynamic",
                    "wt2-mos-finetuned-dynamic",
                    "wt2-doc-original",
                ),
            ),
        },
    ),
    "wang": Paper(
        "Wang, Gong & Liu 2019, Improving Neural Language Modeling via Adversarial Training (ICML)",
        "adversarial-softmax_wang-gong-liu-2019.txt",
        {
            "text": Table(
                "the rows section 5.1 describes (both stages, then dynamic evaluation) for AWD-LSTM and MoS; our "
                "copy ends before the result tables, so only the abstract's two test perplexities are known",
                tuple(
                    f"{data}-{model}{stage}"
                    for data in ("ptb", "wt2")
                    for model in ("awd-lstm-advsoft", "mos-advsoft")
                    for stage in ("-stage1", "", "-dynamic")
                ),
            ),
        },
    ),
    "baevski": Paper(
        "Baevski & Auli 2019, Adaptive Input Representations for Neural Language Modeling (ICLR)",
        "adaptive-input_baevski-auli-2019.txt",
        {
            "1": Table(
                "test perplexity on billion word (own rows)",
                ("char-cnn", "adaptive-inputs", "adaptive-inputs-large", "adaptive-inputs-very-large"),
            ),
            "2": Table("test perplexity on WikiText-103 (own row)", ("adaptive-inputs",)),
            "3": Table(
                "input and output layer factorizations on WikiText-103",
                ("sm", "bpe", "bpe-t", "sm-t", "asm", "cnn", "adp", "adp-t"),
            ),
            "4": Table(
                "input and output layer factorizations on billion word", ("bpe-t", "bpe", "asm", "cnn", "adp", "adp-t")
            ),
            "5": Table(
                "context sizes in training and inference on WikiText-103",
                (
                    "block512-ctx0",
                    "block512-ctx480",
                    "block2048-ctx0",
                    "block2048-ctx1536",
                    "block3072-ctx0",
                    "block3072-ctx2560",
                ),
            ),
            "6": Table(
                "regularizing rare words in the adaptive softmax on WikiText-103",
                ("softmax", "adaptive-tail-dropout-0", "adaptive-tail-dropout-0.2"),
            ),
            "7": Table(
                "validation perplexity of the appendix's input and output variants on WikiText-103 (the repeated "
                "512d tied softmax row once)",
                (
                    "emb256-adaptive",
                    "emb128-adaptive",
                    "emb64-adaptive",
                    "emb32-adaptive",
                    "emb512-softmax-tied",
                    "emb512-softmax-tied-dropout0.4",
                    "emb512-softmax",
                    "emb512-softmax-dropout0.4",
                    "emb256-softmax-tied",
                    "emb256-softmax",
                    "emb64-softmax512",
                    "adaptive-tied-emb",
                    "adaptive-tied-emb-proj",
                    "adaptive-tied-emb-proj-head",
                    "emb512-adaptive-tied-nodim",
                ),
            ),
            "8": Table(
                "band sizes of tied adaptive inputs and outputs on WikiText-103 (the sixth row, printed "
                "20k/40k/200k 19.99, is ambiguous in our copy and left out)",
                ("20k-40k-200k", "20k-140k-100k", "20k-40k-60k-140k", "60k-100k-100k", "5k-155k-100k", "10k-60k-190k"),
            ),
        },
    ),
    "reglm": Paper(
        "reglm, the toolkit's own tables",
        "",
        {
            "smoke": Table(
                "the smoke table: a tiny AWD-LSTM and a tiny VD-LSTM on 100 synthetic sentences, to check `reglm "
                "reproduce` end to end in seconds (no paper numbers)",
                ("awd", "vd"),
            )
        },
    ),
}
"""Every paper a preset may name in ``paper.name``, with its tables."""


def table_of(paper: str, table: str) -> Table | None:
    """The table ``paper:table``, or None when either is unknown."""
    entry = PAPERS.get(paper)
    return None if entry is None else entry.tables.get(table)
