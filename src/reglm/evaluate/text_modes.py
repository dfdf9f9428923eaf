"""A text evaluated as ``reglm eval`` evaluates a test split, by any evaluation mode of
:data:`reglm.evaluate.modes.MODES`: the plumbing of :meth:`reglm.api.TrainedModel.evaluate`."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from reglm.errors import ReglmError

if TYPE_CHECKING:
    from reglm.api import TrainedModel
    from reglm.evaluate.perplexity import EvalResult


def evaluate_text(
    lm: TrainedModel, text: str, mode: str, spec: str | None, valid: str | None, train: str | None
) -> EvalResult:
    """``text`` (one ``<eos>`` per line) scored by ``lm`` as ``reglm eval`` scores a test split
    with evaluation ``mode`` and its ``spec``, read as the run of ``lm`` reads its test split
    (the defaults without a run config); ``valid`` and ``train``: the texts a search tunes on and
    dynamic evaluation's ``rms`` rule takes its statistics on."""
    from reglm.config.schema import TrainConfig
    from reglm.data.batchings import eval_block, eval_reading
    from reglm.evaluate.modes import EvalContext, batch_size_for, mode_named, reading_for, refuse_subwords

    chosen = mode_named(mode)
    setting = chosen.parse(spec or "", f"mode {mode} spec")
    if lm.subword is not None:
        refuse_subwords(chosen, "this model")
    if chosen.searches and valid is None:
        raise ReglmError(f"evaluation mode {mode} tunes on validation text; pass valid=TEXT")
    batching = (lm.run_config.train if lm.run_config is not None else TrainConfig()).batching
    ids, ends = lm.text_to_units(text)
    if len(ids) < 2:
        raise ReglmError("evaluate needs a text of at least 2 tokens (the first is context, the rest scored)")
    batch_size = batch_size_for(chosen, setting, batching, "test")
    run_reading = eval_reading(batching, "test", lm.vocab.eos_id)
    reading = reading_for(chosen, run_reading, eval_block(batching), lm.vocab.eos_id, batch_size)
    ctx = EvalContext(
        lm.model,
        torch.tensor(ids),
        "test",
        batch_size,
        reading.bptt,
        reading,
        torch.tensor(ends) if lm.subword is not None else None,
        lm.device,
        False,
        False,
        None if valid is None else torch.tensor(lm.text_to_units(valid)[0]),
        None if train is None else torch.tensor(lm.text_to_units(train)[0]),
    )
    return chosen.run(ctx, setting).result
