"""Old option names: the flat names of before the component layout and before the ``train``
sections, each an alias of its path today, so old commands, presets and run directories keep
working (:func:`reglm.config.build.resolve_key`, :func:`reglm.config.schema.migrate` and
:func:`~reglm.config.schema.regroup`).
"""

from __future__ import annotations

BATCHING_OPTIONS = (
    "batch_size",
    "small_batch_size",
    "eval_batch_size",
    "test_batch_size",
    "bptt",
    "variable_bptt",
    "bptt_p",
    "bptt_std",
    "bptt_min",
    "bptt_max",
    "block_size",
    "max_tokens",
    "update_freq",
    "eval_context",
    "eval_whole_sentences",
)
"""The options of ``train.batching`` that were flat ``train.*`` options, each read by some kinds."""

ALIASES: dict[str, tuple[str, ...]] = {
    "model.emb_size": ("model.input.emb_size",),
    "model.embed_dropout": ("model.input.embed_dropout",),
    "model.input_dropout": ("model.input.dropout",),
    "model.init_range": ("model.input.init_range", "model.encoder.init_range", "model.output.init_range"),
    "model.hidden_size": ("model.encoder.hidden_size",),
    "model.last_hidden_size": ("model.encoder.last_hidden_size",),
    "model.num_layers": ("model.encoder.num_layers",),
    "model.hidden_dropout": ("model.encoder.hidden_dropout",),
    "model.output_dropout": ("model.encoder.output_dropout",),
    "model.weight_dropout": ("model.encoder.weight_dropout",),
    "model.tie_weights": ("model.output.tie_weights",),
    "model.output_bias": ("model.output.bias",),
    "model.n_experts": ("model.output.n_experts",),
    "model.latent_dropout": ("model.output.latent_dropout",),
    "model.doc_experts": ("model.output.doc_experts",),
    "model.mixture_penalty": ("model.output.mixture_penalty",),
    "model.advsoft_alpha": ("model.output.advsoft.alpha",),
    "model.advsoft_epsilon": ("model.output.advsoft.epsilon",),
    "model.advsoft_grad": ("model.output.advsoft.grad",),
    "model.advsoft_positive_only": ("model.output.advsoft.positive_only",),
    "model.advsoft": ("model.output.advsoft",),
    "train.lr": ("train.optimizer.lr",),
    "train.weight_decay": ("train.optimizer.weight_decay",),
    "train.trigger": ("train.averaging.trigger",),
    "train.nonmono": ("train.averaging.nonmono",),
    "train.lr_decay": ("train.schedule.decay",),
    "train.lr_decay_start": ("train.schedule.decay_start",),
    "train.plateau_factor": ("train.schedule.plateau_factor",),
    **{f"train.{name}": (f"train.batching.{name}",) for name in BATCHING_OPTIONS},
    **{f"train.{name}": (f"train.terms.{name}",) for name in ("ar_alpha", "tar_beta", "aug_gamma", "aug_tau")},
    "train.aug_target_grad": ("train.terms.aug_target_grad",),
    "train.input_noise_std": ("train.input_noise.std",),
    "train.input_noise_anneal": ("train.input_noise.anneal",),
    "train.input_noise_epochs": ("train.input_noise.epochs",),
    "train.finetune": ("train.finetune.enabled",),
    "train.finetune_epochs": ("train.finetune.epochs",),
    "train.finetune_lr": ("train.finetune.lr",),
    "train.finetune_input_noise_std": ("train.finetune.input_noise_std",),
    "train.advsoft_finetune": ("train.finetune.advsoft",),
    "train.log_interval": ("train.log.interval",),
    "train.tensorboard": ("train.log.tensorboard",),
}
"""Old flat option -> its path(s) in the component layout. An alias with several targets sets
each one the chosen kinds have (``model.init_range`` was one range for every layer); so does an
old ``train.*`` batching option (:data:`LENIENT_ALIASES`): the flat layout had every one for every
batching, and a kind that does not read it ignored it, as it still does (also under its bare
name, ``bptt=70``)."""

LENIENT_ALIASES = frozenset(f"train.{name}" for name in BATCHING_OPTIONS)

OLD_AVERAGING = {"ntasgd": "ntasgd", "sgd": "none"}
"""The old ``train.optimizer`` values: they named the averaging policy."""
