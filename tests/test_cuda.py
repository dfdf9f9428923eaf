"""Every model family on CUDA (skipped with a reason without a CUDA device): 20 training steps
and an evaluation, the same evaluation as on the CPU for fixed weights, and finite bf16 runs."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

from reglm.config import build_config
from reglm.data.vocab import EOS, Vocab
from reglm.evaluate.perplexity import evaluate
from reglm.models import LanguageModel

pytestmark = pytest.mark.cuda

SMALL = ["data.synthetic_sentences=200", "train.max_steps=20", "train.finetune=false", "train.epochs=1"]
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from gpu_check import FAMILIES  # noqa: E402  (the device check's list: every family once)


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_family_trains_and_evaluates_on_cuda(family: str, precision: str, tmp_path: Path) -> None:
    from reglm.train.run import train

    preset, overrides = FAMILIES[family]
    config = build_config(preset, [*overrides, *SMALL, "train.device=cuda", f"train.precision={precision}"])
    results = train(config, tmp_path / "run", progress=False)
    assert math.isfinite(results["valid"]["loss"]) and math.isfinite(results["test"]["loss"])


@pytest.mark.parametrize("family", list(FAMILIES))
def test_cuda_evaluation_equals_cpu_for_fixed_weights(family: str) -> None:
    preset, overrides = FAMILIES[family]
    torch.manual_seed(0)
    cfg = build_config(preset, overrides).model
    model = LanguageModel(cfg, 1001, Vocab([EOS, *(f"w{i}" for i in range(1, 1001))], [1] * 1001))
    ids = torch.randint(0, 1001, (600,))
    cpu = evaluate(model, ids, 4, 35)
    gpu = evaluate(model.cuda(), ids, 4, 35, device="cuda")
    assert gpu.tokens == cpu.tokens
    assert gpu.loss == pytest.approx(cpu.loss, rel=1e-4)
