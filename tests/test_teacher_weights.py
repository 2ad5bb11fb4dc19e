"""Published teacher weights: fetched over HTTP, checksum verified, loaded, mismatches named.

The state dicts are built here (a compact teacher's, a torchvision ResNet-18's)
and served by a real loopback HTTP server, as a model zoo would serve them.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import pytest
import torch
import torchvision
from workspace import build_data, run_cli, write_params

from refinery import models
from refinery.errors import ParamsError
from refinery.params import parse_params


def _config(arch: str, side: int = 8, channels: int = 1, stem: str = "auto") -> models.ModelConfig:
    return models.ModelConfig(arch=arch, in_channels=channels, image_size=side, num_classes=0,
                              mean=(0.5,) * channels, std=(0.25,) * channels, stem=stem)  # type: ignore[arg-type]


def _bytes(state: dict[str, torch.Tensor]) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def test_weights_load_exactly_and_a_foreign_head_is_dropped() -> None:
    source = models.build_model(_config("compact"))
    state = {f"backbone.{k}": v for k, v in source.backbone.state_dict().items()}
    state["fc.weight"] = torch.zeros(1000, 256)  # an ImageNet head: not the teacher's
    target = models.build_model(_config("compact"))
    dropped = models.load_backbone_weights(target.backbone, state, "zoo.pth")
    assert dropped == ["fc.weight"]
    for key, value in source.backbone.state_dict().items():
        assert torch.equal(target.backbone.state_dict()[key], value), key


def test_imagenet_resnet_weights_on_a_small_gray_teacher_name_every_misfit() -> None:
    imagenet = torchvision.models.resnet18(weights=None).state_dict()  # ImageNet's layout
    del imagenet["layer4.1.bn2.running_var"]
    teacher = models.build_model(_config("resnet18", side=8, channels=1))  # 3x3 gray stem
    with pytest.raises(ValueError) as info:
        models.load_backbone_weights(teacher.backbone, imagenet, "resnet18-f37072fd.pth")
    text = str(info.value)
    assert "shape conv1.weight: (64, 3, 7, 7) in the file, (64, 1, 3, 3) in the teacher" in text
    assert "missing: layer4.1.bn2.running_var" in text
    assert "images.channels: 3 and model.teacher.stem: imagenet" in text
    # with the ImageNet stem and RGB, the same weights fit
    fitting = models.build_model(_config("resnet18", side=64, channels=3, stem="imagenet"))
    imagenet = torchvision.models.resnet18(weights=None).state_dict()
    assert models.load_backbone_weights(fitting.backbone, imagenet, "x") == ["fc.weight",
                                                                             "fc.bias"]


def test_the_checksum_is_required_and_must_be_sha256() -> None:
    with pytest.raises(ParamsError, match=r"model\.teacher\.weights\.checksum"):
        parse_params({"model": {"teacher": {"weights": {"url": "https://x/w.pth"}}}})
    with pytest.raises(ParamsError, match=r"model\.teacher\.weights\.checksum"):
        parse_params({"model": {"teacher": {"weights": {"url": "https://x/w.pth",
                                                        "checksum": "md5:abc"}}}})


@pytest.mark.slow
def test_pretraining_starts_from_weights_served_over_http(tmp_path: Path,
                                                          loopback_server) -> None:
    """The pretrain stage fetches the weights, checks the checksum, and trains from them
    (at a learning rate too small to move them, so the start is visible in the result)."""
    zoo = models.build_model(_config("compact"))
    body = _bytes(zoo.backbone.state_dict())
    url = loopback_server.serve("/zoo/compact.pth", body)
    digest = hashlib.sha256(body).hexdigest()
    tiny = {"pretrain.epochs": 1, "pretrain.min_steps": 0, "pretrain.optim.lr": 1e-12,
            "pretrain.optim.warmup_epochs": 0, "pretrain.knn_every": 1}

    wrong = tmp_path / "wrong"
    wrong.mkdir()
    params = write_params(wrong, {**tiny, "model.teacher.weights": {
        "url": url, "checksum": "sha256:" + "0" * 64}})
    build_data(wrong, params)
    failed = run_cli(wrong, "pretrain", check=False)
    assert failed.returncode != 0 and "checksum" in failed.stderr.lower()
    assert not (wrong / "models/pretrained").exists()

    ws = tmp_path / "ws"
    ws.mkdir()
    params = write_params(ws, {**tiny, "model.teacher.weights": {
        "url": url, "checksum": f"sha256:{digest}"}})
    build_data(ws, params)
    run_cli(ws, "pretrain")
    trained = models.load_model(ws / "models/pretrained")
    assert trained.config.arch == "compact"
    for key, value in zoo.backbone.state_dict().items():
        if "running_" in key or "num_batches" in key:
            continue  # BN statistics follow the data in train mode
        torch.testing.assert_close(trained.backbone.state_dict()[key], value,
                                   rtol=0, atol=1e-6, msg=key)
    assert loopback_server.count("/zoo/compact.pth") == 2  # one per workspace
    run_cli(ws, "pretrain")  # a rerun takes the verified copy from the download cache
    assert loopback_server.count("/zoo/compact.pth") == 2
