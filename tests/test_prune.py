"""Structured pruning: whole channels go, the model stays a plain state dict, and int8 follows.

The stage end to end (prune, recover, quantize the pruned student, evaluate it
as its own row) runs in the pipeline tests; here, the pieces that must hold
for any student.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from refinery import models
from refinery.pipeline import MODELS, int8_row, model_row, stage_named
from refinery.stages.prune import prune_channels


def _student(width: int = 16, depth: tuple[int, ...] = (2, 2)) -> models.ImageClassifier:
    config = models.ModelConfig(arch="student", in_channels=1, image_size=8, num_classes=4,
                                classes=("a", "b", "c", "d"), mean=(0.3,), std=(0.4,),
                                width=width, depth=depth)
    torch.manual_seed(0)
    return models.build_model(config).eval()


def _convs(model: nn.Module) -> list[nn.Conv2d]:
    return [m for m in model.modules() if isinstance(m, nn.Conv2d)]


def test_half_the_channels_of_every_layer_go_and_the_model_still_runs() -> None:
    model = _student()
    before = [conv.out_channels for conv in _convs(model)]
    params_before = models.parameter_count(model)
    prune_channels(model, 0.5)
    assert [conv.out_channels for conv in _convs(model)] == [c // 2 for c in before]
    assert model.head.out_features == 4  # the classes are not pruned
    assert models.parameter_count(model) < params_before / 3.5  # ~(1/2)^2 of the weights
    assert model(torch.rand(3, 1, 8, 8)).shape == (3, 4)
    assert model.config.pruned


def test_a_pruned_model_saves_and_loads_as_a_plain_state_dict(tmp_path: Path) -> None:
    model = prune_channels(_student(), 0.5)
    models.save_model(model, tmp_path / "pruned")
    loaded = models.load_model(tmp_path / "pruned").eval()  # torch.load(weights_only=True)
    images = torch.rand(5, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(model(images), loaded(images))
    assert models.parameter_count(loaded) == models.parameter_count(model)


def test_the_kept_channels_are_the_strongest() -> None:
    """L2 magnitude: scale one filter of the stem up, and it must survive."""
    model = _student()
    stem = model.backbone.stem[0]
    with torch.no_grad():
        stem.weight[5].mul_(100)
        strongest = stem.weight[5].clone()
    prune_channels(model, 0.5)
    kept = model.backbone.stem[0].weight
    assert any(torch.equal(kept[i], strongest) for i in range(kept.shape[0]))


def test_the_pipeline_quantizes_and_evaluates_the_pruned_student() -> None:
    pruned = model_row("student_pruned")
    assert int8_row().source == "student_pruned"  # quantize takes the pruned student
    assert pruned.source == "student" and pruned.compared_to == "student"
    assert pruned.path in stage_named("quantize").deps
    assert pruned.path in stage_named("evaluate").deps
    names = [row.name for row in MODELS]
    assert names.index("student") < names.index("student_pruned") < names.index("student_int8")
    with pytest.raises(ValueError, match="not made from another"):
        _ = model_row("scratch").source_path
