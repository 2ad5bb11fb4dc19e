"""Teacher and student networks: any input size, saving and loading, exact tap cropping."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from refinery import models


def _config(arch: str, size: int, channels: int = 3, **extra: object) -> models.ModelConfig:
    return models.ModelConfig(arch=arch, in_channels=channels, image_size=size, num_classes=10,
                              mean=(0.5,) * channels, std=(0.25,) * channels,
                              classes=tuple("abcdefghij"), **extra)


@pytest.mark.parametrize(("arch", "size", "channels"), [
    ("resnet18", 8, 1), ("resnet18", 32, 3), ("resnet18", 96, 3), ("resnet34", 32, 3),
    ("resnet50", 16, 1), ("student", 8, 1), ("student", 32, 3), ("student", 64, 3),
    ("compact", 8, 1), ("compact", 32, 3),
])
def test_every_arch_takes_its_input_size(arch: str, size: int, channels: int) -> None:
    model = models.build_model(_config(arch, size, channels)).eval()
    with torch.no_grad():
        out = model(torch.rand(2, channels, size, size))
    assert out.shape == (2, 10)


@pytest.mark.parametrize("arch", ["resnet18", "compact"])
def test_each_stem_sets_the_first_stage_resolution(arch: str) -> None:
    """small keeps 32 px, strided halves it, imagenet quarters it; auto is small at 32 px."""
    seen: dict[str, int] = {}
    for stem, expected in (("small", 32), ("strided", 16), ("imagenet", 8), ("auto", 32)):
        model = models.build_model(_config(arch, 32, stem=stem)).eval()
        first = model.backbone.layer1 if arch == "resnet18" else model.backbone.blocks[0]
        first.register_forward_pre_hook(lambda _, args, s=stem: seen.update({s: args[0].shape[-1]}))
        with torch.no_grad():
            assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)
        assert seen[stem] == expected, (stem, seen)


def test_student_is_much_smaller_than_the_teacher() -> None:
    teacher = models.build_model(_config("resnet18", 32))
    student = models.build_model(_config("student", 32, width=32, depth=(2, 2, 2)))
    assert models.parameter_count(teacher) >= 5 * models.parameter_count(student)


def test_auto_picks_the_compact_teacher_for_small_images() -> None:
    assert models.teacher_arch("auto", 8) == models.teacher_arch("auto", 16) == "compact"
    assert models.teacher_arch("auto", 32) == "resnet18"
    assert models.teacher_arch("resnet34", 8) == "resnet34"  # a named arch is kept
    compact = models.parameter_count(models.build_model(_config("compact", 8, 1)))
    student = models.parameter_count(models.build_model(_config("student", 8, 1, width=32,
                                                               depth=(2, 2, 2))))
    resnet = models.parameter_count(models.build_model(_config("resnet18", 8, 1)))
    assert 3 * student < compact < resnet / 3  # between the student and a ResNet-18


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    model = models.build_model(_config("student", 8, 1, width=8, depth=(1, 1))).eval()
    models.save_model(model, tmp_path / "m", extra={"stage": "test"})
    loaded = models.load_model(tmp_path / "m").eval()
    x = torch.rand(3, 1, 8, 8)
    assert torch.equal(model(x), loaded(x))
    assert loaded.config == model.config
    # plain tensors only: loads with weights_only=True
    torch.load(tmp_path / "m" / "model.pt", weights_only=True)


def test_tap_cropping_is_exact_on_tiny_maps() -> None:
    """ResNet-18 on 8x8 images crops padded taps; outputs and gradients match plain convs."""
    torch.manual_seed(0)
    cropped = models.build_model(_config("resnet18", 8, 1))
    assert any(isinstance(m, models.TapCroppedConv2d) for m in cropped.modules())
    plain = models.build_model(_config("resnet18", 8, 1))
    for module in list(plain.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, models.TapCroppedConv2d):
                conv = nn.Conv2d(child.in_channels, child.out_channels, child.kernel_size,
                                 child.stride, child.padding, bias=child.bias is not None)
                setattr(module, child_name, conv)
    plain.load_state_dict(cropped.state_dict())
    x = torch.rand(16, 1, 8, 8)
    a, b = cropped(x), plain(x)
    assert torch.allclose(a, b, atol=1e-5)
    a.square().sum().backward()
    b.square().sum().backward()
    for (name, p), q in zip(cropped.named_parameters(), plain.parameters(), strict=True):
        assert torch.allclose(p.grad, q.grad, atol=1e-4, rtol=1e-3), name


def test_an_architecture_is_registered_once() -> None:
    with pytest.raises(ValueError, match="registered twice"):
        models.register_model("resnet18")(lambda config: (torch.nn.Identity(), 1))
    with pytest.raises(ValueError, match="unknown model arch 'nope'"):
        models.build_model(_config("nope", 8, 1))


def test_lpft_fits_the_head_to_the_frozen_features() -> None:
    """LP-FT's first step: a head that separates what the frozen features separate."""
    from refinery.stages.finetune import fit_head

    torch.manual_seed(0)
    model = models.build_model(_config("student", 8, 1, width=8, depth=(1, 1)))
    images = torch.randint(0, 256, (500, 1, 8, 8), dtype=torch.uint8)
    with torch.no_grad():
        model.eval()
        features = model.features(images.float() / 255)
    score = features @ torch.randn(features.shape[1])
    score = (score - score.median()) / score.std()
    keep = score.abs() > 0.5  # linearly separable with a margin
    images, labels = images[keep], (score[keep] > 0).long()
    train, val = slice(0, len(images) - 80), slice(len(images) - 80, None)
    backbone_before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    model.train()
    probe = fit_head(model, images[train], labels[train], images[val], labels[val])
    assert probe.train_acc >= 0.95 and probe.val_acc >= 0.9
    assert model.training  # restored
    assert all(torch.equal(v, model.backbone.state_dict()[k])  # the backbone is untouched
               for k, v in backbone_before.items())
    with torch.no_grad():
        model.eval()
        predicted = model(images[val].float() / 255).argmax(1)
    assert (predicted == labels[val]).float().mean() == pytest.approx(probe.val_acc)
