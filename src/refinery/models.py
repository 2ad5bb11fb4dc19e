"""Teacher and student networks, and how they are saved.

Every model takes float images in ``[0, 1]``, shape ``(N, C, H, W)``, and
normalizes them itself (the statistics are buffers), so an exported or
quantized model needs nothing from this project to be used.

Saved form: ``model.pt`` (a state dict, loaded with ``weights_only=True``)
and ``config.json`` (what to build), both in one folder.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from refinery import fsutil

Backbone = Callable[["ModelConfig"], tuple[nn.Module, int]]  # config -> (module, feature dim)
_BACKBONES: dict[str, Backbone] = {}


def register_model(name: str) -> Callable[[Backbone], Backbone]:
    """Register a backbone builder under ``name`` (a ``model.*.arch`` value).

    The registry is the one list of architectures: params are checked against
    it (:mod:`refinery.plan`) and :func:`build_model` builds from it.
    """
    def register(builder: Backbone) -> Backbone:
        if name in _BACKBONES:
            raise ValueError(f"model {name!r} is registered twice")
        _BACKBONES[name] = builder
        return builder
    return register


def available() -> list[str]:
    """The registered architecture names."""
    return list(_BACKBONES)


#: ``stem: auto`` keeps a 3x3 stride-1 stem up to this image side, the ImageNet stem above.
SMALL_STEM_MAX_SIDE = 32

#: What each ``stem`` value does to the input resolution before the first stage:
#: small keeps it (3x3 stride 1), strided halves it (3x3 stride 2: a quarter of the
#: work at the same side, the CPU-budget choice at 32 px), imagenet quarters it
#: (7x7 stride 2 and a 3x3 stride-2 max-pool, the layout published weights expect).
Stem = Literal["auto", "small", "strided", "imagenet"]


@dataclass(frozen=True)
class ModelConfig:
    arch: str  # a torchvision ResNet name, or "student"
    in_channels: int
    image_size: int
    num_classes: int  # 0: no head (a backbone, as pretraining leaves it)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: tuple[str, ...] = ()
    stem: Stem = "auto"
    width: int = 32  # student only
    depth: tuple[int, ...] = field(default=(1, 1, 1))  # student only
    pruned: bool = False  # channel-pruned: layer widths come from the saved state dict

    def with_classes(self, classes: list[str] | tuple[str, ...]) -> ModelConfig:
        return replace(self, num_classes=len(classes), classes=tuple(classes))

    @property
    def resolved_stem(self) -> str:
        if self.stem != "auto":
            return self.stem
        # CIFAR's 3x3 stride-1 stem keeps layer1 at full resolution: right at 32 px, 4x
        # the work at 64 px (a 200-photo set at 64 px took over a minute per 10 SimCLR
        # steps on a 2-core CPU); above 32 px the ImageNet stem (/4) pays for itself.
        return "small" if self.image_size <= SMALL_STEM_MAX_SIDE else "imagenet"

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> ModelConfig:
        data = dict(data)
        for key in ("mean", "std", "classes", "depth"):
            if key in data:
                data[key] = tuple(data[key])
        return cls(**data)


class Normalize(nn.Module):
    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class ImageClassifier(nn.Module):
    """normalize -> backbone (pooled features) -> linear head."""

    def __init__(self, backbone: nn.Module, feature_dim: int, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.feature_dim = feature_dim
        self.normalize = Normalize(config.mean, config.std)
        self.backbone = backbone
        self.head: nn.Module = (
            nn.Linear(feature_dim, config.num_classes) if config.num_classes else nn.Identity()
        )

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(self.normalize(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class TapCroppedConv2d(nn.Conv2d):
    """A Conv2d that skips the kernel taps which only ever read zero padding.

    On tiny feature maps (ResNet-18's last stage sees 1x1 maps on 8x8 inputs)
    a padded 3x3 convolution multiplies 8 of its 9 taps by padding; the
    result is the same with those taps cut away, and oneDNN's weight gradient
    for the full kernel on a 1x1 map is pathologically slow (over 30x the
    forward pass on CPU). Outputs and gradients are identical (the cut taps'
    gradient is exactly zero either way); larger maps take the plain path.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        crop = _used_taps(x.shape[-2], self.kernel_size[0], self.stride[0], self.padding[0]), \
            _used_taps(x.shape[-1], self.kernel_size[1], self.stride[1], self.padding[1])
        (r0, r1), (c0, c1) = crop
        if (r0, r1, c0, c1) == (0, self.kernel_size[0], 0, self.kernel_size[1]) \
                or self.groups != 1 or self.dilation != (1, 1):
            return super().forward(x)
        return nn.functional.conv2d(x, self.weight[:, :, r0:r1, c0:c1], self.bias, self.stride,
                                    (self.padding[0] - r0, self.padding[1] - c0))


@functools.lru_cache(maxsize=256)
def _used_taps(size: int, kernel: int, stride: int, padding: int) -> tuple[int, int]:
    """First and past-the-last kernel tap that reads a real (not padding) input pixel."""
    outputs = (size + 2 * padding - kernel) // stride + 1
    used = [i for i in range(kernel)
            if any(0 <= o * stride + i - padding < size for o in range(outputs))]
    return used[0], used[-1] + 1


def _crop_convolutions(module: nn.Module) -> None:
    for name, child in module.named_children():
        if type(child) is nn.Conv2d and child.padding != (0, 0):
            cropped = TapCroppedConv2d(child.in_channels, child.out_channels, child.kernel_size,
                                       child.stride, child.padding, child.dilation,
                                       child.groups, child.bias is not None)
            cropped.weight, cropped.bias = child.weight, child.bias
            setattr(module, name, cropped)
        else:
            _crop_convolutions(child)


def _resnet_backbone(config: ModelConfig) -> tuple[nn.Module, int]:
    """A torchvision ResNet (``config.arch``), its stem fitted to the image side."""
    import torchvision

    net = getattr(torchvision.models, config.arch)(weights=None)
    if config.resolved_stem == "small":
        # CIFAR-style stem: a 7x7/2 conv and a max-pool would shrink 32x32 to 8x8 at once.
        net.conv1 = nn.Conv2d(config.in_channels, 64, 3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    elif config.resolved_stem == "strided":
        net.conv1 = nn.Conv2d(config.in_channels, 64, 3, stride=2, padding=1, bias=False)
        net.maxpool = nn.Identity()
    elif config.in_channels != 3:
        net.conv1 = nn.Conv2d(config.in_channels, 64, 7, stride=2, padding=3, bias=False)
    feature_dim = net.fc.in_features
    net.fc = nn.Identity()
    if config.image_size < 32:
        _crop_convolutions(net)  # the last stages see maps smaller than the kernel
    return net, feature_dim


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class StudentBackbone(nn.Module):
    """A small ResNet: width doubles and resolution halves at each stage."""

    def __init__(self, in_channels: int, width: int, depth: tuple[int, ...],
                 stem: str = "small") -> None:
        super().__init__()
        kernel, stride = (7, 2) if stem == "imagenet" else (3, 2 if stem == "strided" else 1)
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, width, kernel, stride=stride, padding=kernel // 2, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
        ]
        if stem == "imagenet":
            layers.append(nn.MaxPool2d(3, stride=2, padding=1))
        self.stem = nn.Sequential(*layers)
        blocks: list[nn.Module] = []
        c_in = width
        for index, count in enumerate(depth):
            c_out = width * 2**index
            for block in range(count):
                blocks.append(BasicBlock(c_in, c_out, stride=2 if index > 0 and block == 0 else 1))
                c_in = c_out
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.out_dim = c_in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(self.blocks(self.stem(x))), 1)


for _name in ("resnet18", "resnet34", "resnet50"):
    register_model(_name)(_resnet_backbone)


@register_model("student")
def _student_backbone(config: ModelConfig) -> tuple[nn.Module, int]:
    backbone = StudentBackbone(config.in_channels, config.width, config.depth,
                               config.resolved_stem)
    return backbone, backbone.out_dim


#: The compact teacher: the student's family at twice the default student's width
#: (64, 128, 256 channels; 2.8M parameters, 4x the student); its stem follows ``stem``.
COMPACT_WIDTH, COMPACT_DEPTH = 64, (2, 2, 2)


@register_model("compact")
def _compact_backbone(config: ModelConfig) -> tuple[nn.Module, int]:
    backbone = StudentBackbone(config.in_channels, COMPACT_WIDTH, COMPACT_DEPTH,
                               config.resolved_stem)
    return backbone, backbone.out_dim


#: ``model.teacher.arch: auto`` picks ``compact`` up to this image side, ``resnet18`` above.
#: A ResNet-18 on 8x8 digits spends most of its 11M parameters' work on 1x1 maps; the
#: compact network trains several times faster there, so the CPU default can pretrain
#: long enough to matter.
AUTO_COMPACT_MAX_SIDE = 16


def teacher_arch(arch: str, image_size: int) -> str:
    """The architecture ``model.teacher.arch`` names, with ``auto`` resolved by image side."""
    if arch != "auto":
        return arch
    return "compact" if image_size <= AUTO_COMPACT_MAX_SIDE else "resnet18"


def build_model(config: ModelConfig) -> ImageClassifier:
    """The registered architecture ``config.arch``, with its normalization and head."""
    if config.arch not in _BACKBONES:
        raise ValueError(f"unknown model arch {config.arch!r}; expected one of {available()}")
    backbone, dim = _BACKBONES[config.arch](config)
    return ImageClassifier(backbone, dim, config)


def load_backbone_weights(backbone: nn.Module, state: dict[str, torch.Tensor],
                          source: str) -> list[str]:
    """Copy a published state dict into ``backbone``; return the keys it did not use.

    Keys are the backbone's own (a torchvision ResNet's: ``conv1.weight``,
    ``layer1.0.bn1.running_mean``...); a ``backbone.`` prefix (this project's
    own saved models) is accepted, and a classification head (``fc.*``,
    ``head.*``) is dropped: it was trained for other classes. Every missing
    key and every shape that does not fit is named at once, with what to change.
    """
    state = {k.removeprefix("backbone."): v for k, v in state.items()}
    own = backbone.state_dict()
    dropped = [k for k in state if k.split(".")[0] in ("fc", "head") and k not in own]
    unknown = [k for k in state if k not in own and k not in dropped]
    missing = [k for k in own if k not in state]
    mismatched = [f"{k}: {tuple(state[k].shape)} in the file, {tuple(own[k].shape)} in the "
                  "teacher" for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unknown or mismatched:
        lines = [f"model.teacher.weights ({source}) do not fit the teacher:"]
        lines += [f"  shape {line}" for line in mismatched]
        if missing:
            lines.append(f"  missing: {', '.join(missing[:8])}"
                         + (f" (+{len(missing) - 8} more)" if len(missing) > 8 else ""))
        if unknown:
            lines.append(f"  not in the teacher: {', '.join(unknown[:8])}"
                         + (f" (+{len(unknown) - 8} more)" if len(unknown) > 8 else ""))
        if any(line.startswith("conv1.") for line in mismatched):
            lines.append("  ImageNet weights need images.channels: 3 and "
                         "model.teacher.stem: imagenet (a 7x7 stride-2 stem)")
        raise ValueError("\n".join(lines))
    backbone.load_state_dict({k: v for k, v in state.items() if k in own})
    return dropped


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def save_model(model: ImageClassifier, directory: str | Path, extra: dict | None = None) -> Path:
    """Write ``model.pt`` and ``config.json`` into ``directory`` (each atomically)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}
    fsutil.torch_save(state, directory / "model.pt")
    payload = {"config": unwrap(model).config.to_json(), **(extra or {})}
    fsutil.write_json(directory / "config.json", payload)
    return directory


def load_config(directory: str | Path) -> ModelConfig:
    payload = json.loads((Path(directory) / "config.json").read_text())
    return ModelConfig.from_json(payload["config"])


def load_model(directory: str | Path, map_location: str | torch.device = "cpu") -> ImageClassifier:
    directory = Path(directory)
    config = load_config(directory)
    model = build_model(config)
    state = torch.load(directory / "model.pt", map_location=map_location, weights_only=True)
    if config.pruned:
        fit_to_state(model, state)
    model.load_state_dict(state)
    return model


def fit_to_state(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """Resize convolutions, batch norms and linear layers to the shapes in ``state``.

    A channel-pruned model (the ``prune`` stage) keeps its architecture but not its
    widths; its state dict alone says them, so a pruned model still saves and loads
    as a plain ``weights_only`` state dict plus ``config.json``.
    """
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        weight = state.get(prefix + "weight")
        if weight is None:
            continue
        if isinstance(module, nn.Conv2d):
            module.out_channels = weight.shape[0]
            module.in_channels = weight.shape[1] * module.groups
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.num_features = weight.shape[0]
        elif isinstance(module, nn.Linear):
            module.out_features, module.in_features = weight.shape
        else:
            continue
        for key, tensor in module._parameters.items():
            if tensor is not None and prefix + key in state:
                module._parameters[key] = nn.Parameter(torch.empty_like(state[prefix + key]))
        for key, tensor in module._buffers.items():
            if tensor is not None and prefix + key in state:
                module._buffers[key] = torch.empty_like(state[prefix + key])
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DDP and torch.compile wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model
