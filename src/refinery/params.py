"""The one typed schema for ``params.yaml``.

Every knob of every stage lives here, grouped by stage. Loading goes through
:func:`load_params`, which rejects unknown keys, wrong types and out-of-range
values *before* any work starts, with a message that names the key
(``download.http.retries``) and says what was expected.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from refinery.errors import ParamsError

__all__ = ["Params", "ParamsError", "apply_overrides", "flatten", "load_params", "parse_params"]

DEFAULT_PARAMS_FILE = Path("params.yaml")

GiB = 1024**3

#: Official CIFAR-10 binary archive and its published md5 (cs.toronto.edu/~kriz/cifar.html).
CIFAR10_BINARY_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
CIFAR10_BINARY_CHECKSUM = "md5:c32a1d4ab5d03f1284b67883e8d87530"


class Section(BaseModel):
    """Base of every params group: unknown keys are errors, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


Fraction = Annotated[float, Field(gt=0.0, lt=1.0)]
Probability = Annotated[float, Field(ge=0.0, le=1.0)]


def _ordered_pair(value: tuple[float, float], name: str) -> tuple[float, float]:
    lo, hi = value
    if lo > hi:
        raise ValueError(f"{name} must be [low, high] with low <= high, got [{lo}, {hi}]")
    return value


# --------------------------------------------------------------------------- data


class HttpParams(Section):
    timeout_s: float = Field(30.0, gt=0, description="connect/read timeout per request")
    retries: int = Field(5, ge=0, le=50, description="retries on transient errors")
    backoff_s: float = Field(1.0, ge=0, le=600, description="first retry delay; doubles each try")


class ExtractLimits(Section):
    """Caps that stop a decompression bomb before it fills the disk."""

    max_bytes: int = Field(8 * GiB, gt=0)
    max_files: int = Field(2_000_000, gt=0)


class DownloadParams(Section):
    source: Literal["builtin", "cifar10-binary", "image-folder"] = "builtin"
    builtin: Literal["digits"] = "digits"
    url: str | None = Field(
        None, description="http(s):// or file:// URL, or a local path; cifar10-binary defaults "
        "to the official archive"
    )
    checksum: str | None = Field(None, description="'sha256:<hex>' or 'md5:<hex>'")
    train_split: str = Field("train", min_length=1)
    test_split: str | None = Field(
        "test", description="folder of the test split; null: one split, divided with a seeded split"
    )
    test_fraction: Fraction = Field(0.2, description="test share when the source has one split")
    http: HttpParams = HttpParams()
    limits: ExtractLimits = ExtractLimits()

    @field_validator("checksum")
    @classmethod
    def _checksum_format(cls, value: str | None) -> str | None:
        if value is None:
            return value
        match = re.fullmatch(r"(sha256|md5):([0-9a-fA-F]+)", value)
        lengths = {"sha256": 64, "md5": 32}
        if not match or len(match.group(2)) != lengths[match.group(1)]:
            raise ValueError("expected 'sha256:<64 hex digits>' or 'md5:<32 hex digits>'")
        return f"{match.group(1)}:{match.group(2).lower()}"

    @field_validator("train_split", "test_split")
    @classmethod
    def _plain_folder_name(cls, value: str | None) -> str | None:
        if value is not None and (value in {".", ".."} or "/" in value or "\\" in value):
            raise ValueError("expected a plain folder name")
        return value

    @model_validator(mode="after")
    def _source_needs_url(self) -> DownloadParams:
        if self.source == "image-folder" and not self.url:
            raise ValueError("url: an image-folder source needs a url or path")
        if self.test_split is not None and self.test_split == self.train_split:
            raise ValueError("test_split: must differ from train_split (or be null)")
        return self

    def resolved_url(self) -> str | None:
        if self.source == "cifar10-binary" and not self.url:
            return CIFAR10_BINARY_URL
        return self.url

    def resolved_checksum(self) -> str | None:
        if self.source == "cifar10-binary" and not self.url and not self.checksum:
            return CIFAR10_BINARY_CHECKSUM
        return self.checksum


class ImageParams(Section):
    """The shape every image is converted to, whatever its source size and mode.

    ``side``, not ``size``: DVC 3.67 leaves every params key named ``size`` or
    ``nfiles`` out of its run-cache key (treeverse/dvc#10296), so a change to it
    would restore stale outputs ("cached - skipping run").
    """

    side: int = Field(8, ge=4, le=1024, description="output height and width in pixels")
    channels: Literal[1, 3] = 1
    resize: Literal["crop", "stretch"] = Field(
        "crop", description="crop: scale the short side then center-crop; stretch: ignore aspect"
    )


class RowBounds(Section):
    train: tuple[int, int] = (1000, 10_000_000)
    test: tuple[int, int] = (200, 10_000_000)

    @field_validator("train", "test")
    @classmethod
    def _ordered(cls, value: tuple[int, int]) -> tuple[int, int]:
        if value[0] < 0:
            raise ValueError("row bounds must be >= 0")
        return _ordered_pair(value, "row bounds")  # type: ignore[return-value]


class ValidateParams(Section):
    drop_undecodable: bool = Field(
        False, description="drop images that fail to decode (counted, logged) instead of failing"
    )
    rows: RowBounds = RowBounds()
    min_class_fraction: Probability = Field(
        0.05, description="every class is at least this share of its split"
    )
    pixel_mean: tuple[float, float] = Field((2.0, 253.0), description="per-image mean, 0..255")
    min_pixel_std: float = Field(1.0, ge=0, description="per-image std below this is blank")
    source_side: tuple[int, int] = Field((4, 16384), description="allowed source width/height")
    max_examples: int = Field(5, ge=1, le=100, description="example files in a failure summary")

    @field_validator("pixel_mean", "source_side")
    @classmethod
    def _ordered(cls, value: tuple[float, float]) -> tuple[float, float]:
        return _ordered_pair(value, "bounds")


class PrepareParams(Section):
    val_fraction: Fraction = Field(0.1, description="share of train held out for validation")
    label_fraction: Annotated[float, Field(gt=0.0, le=1.0)] = Field(
        0.1, description="share of the train split whose labels fine-tuning may use"
    )


# ------------------------------------------------------------------- augmentation


class SupervisedAugParams(Section):
    crop: Literal["translate", "resized", "none"] = "translate"
    translate_px: int = Field(1, ge=0, le=64, description="max shift for crop: translate")
    translate_padding: Literal["reflect", "zeros"] = Field(
        "reflect", description="what a translate shifts in at the border (pad-and-crop's padding)"
    )
    resized_scale: tuple[float, float] = (0.35, 1.0)
    flip: bool = False
    auto: Literal["none", "randaugment", "trivialaugment"] = "none"
    randaugment_ops: int = Field(2, ge=1, le=6)
    randaugment_magnitude: int = Field(9, ge=0, le=30)
    erasing_p: Probability = 0.0
    mixup_alpha: float = Field(0.0, ge=0.0)
    cutmix_alpha: float = Field(0.0, ge=0.0)

    @field_validator("resized_scale")
    @classmethod
    def _scale(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not 0 < value[0] <= value[1] <= 1:
            raise ValueError("expected 0 < low <= high <= 1")
        return value


class SslAugParams(Section):
    crop_scale: tuple[float, float] = (0.3, 1.0)
    crop_ratio: tuple[float, float] = (0.75, 1.3333333)
    flip: bool = False
    jitter_p: Probability = 0.8
    brightness: float = Field(0.4, ge=0.0, le=1.0)
    contrast: float = Field(0.4, ge=0.0, le=1.0)
    saturation: float = Field(0.4, ge=0.0, le=1.0)
    hue: float = Field(0.1, ge=0.0, le=0.5)
    grayscale_p: Probability = 0.2
    blur_p: Probability = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_kernel: int = Field(3, ge=3, le=63, description="odd Gaussian kernel side in pixels")
    rotate_deg: float | Literal["auto"] = Field(
        "auto", description="max rotation either way (RandomAffine degrees); auto: 15 on "
        "1-channel images, where colour jitter has little to change, 0 on RGB")
    noise_std: float | Literal["auto"] = Field(
        "auto", description="std of additive Gaussian pixel noise (0..1 scale); auto: 0.05 on "
        "1-channel images, 0 on RGB")

    @field_validator("rotate_deg")
    @classmethod
    def _rotation(cls, value: float | str) -> float | str:
        if value != "auto" and not 0 <= float(value) <= 180:
            raise ValueError("expected auto or 0..180 degrees")
        return value

    @field_validator("noise_std")
    @classmethod
    def _noise(cls, value: float | str) -> float | str:
        if value != "auto" and not 0 <= float(value) <= 1:
            raise ValueError("expected auto or 0..1")
        return value

    @field_validator("blur_kernel")
    @classmethod
    def _odd(cls, value: int) -> int:
        if value % 2 == 0:
            raise ValueError("expected an odd kernel size")
        return value

    @field_validator("crop_scale")
    @classmethod
    def _scale(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not 0 < value[0] <= value[1] <= 1:
            raise ValueError("expected 0 < low <= high <= 1")
        return value

    @field_validator("crop_ratio", "blur_sigma")
    @classmethod
    def _positive_pair(cls, value: tuple[float, float]) -> tuple[float, float]:
        if value[0] <= 0:
            raise ValueError("expected positive values")
        return _ordered_pair(value, "range")


class AugmentParams(Section):
    supervised: SupervisedAugParams = SupervisedAugParams()
    ssl: SslAugParams = SslAugParams()
    preview_images: int = Field(8, ge=1, le=64, description="rows in the preview grid")


# ------------------------------------------------------------------------- models


class WeightsParams(Section):
    url: str = Field(min_length=1, description="http(s)://, file:// or a local path to a torch "
                     "state dict of the teacher's backbone (e.g. torchvision's ResNet-18 "
                     "ImageNet weights)")
    checksum: str = Field(min_length=1, description="sha256:<hex> of the file (required)")

    @field_validator("checksum")
    @classmethod
    def _sha256(cls, value: str) -> str:
        algo, _, digest = value.partition(":")
        if algo != "sha256" or len(digest) != 64 or any(c not in "0123456789abcdef"
                                                          for c in digest.lower()):
            raise ValueError("expected sha256:<64 hex digits>")
        return value


class TeacherParams(Section):
    arch: str = Field("auto", min_length=1, description="auto, or a registered model "
                      "(refinery.models.available(); checked with the training plan); auto: "
                      "compact up to 16 px images, resnet18 above")
    stem: Literal["auto", "small", "strided", "imagenet"] = Field(
        "auto", description="small: 3x3 stride 1 (full resolution); strided: 3x3 stride 2 (a "
        "quarter of the work); imagenet: 7x7 stride 2 + max-pool; auto: small up to 32 px, "
        "imagenet above"
    )
    weights: WeightsParams | None = Field(
        None, description="published backbone weights to start pretraining from (null: "
        "random initialisation)")


class StudentParams(Section):
    width: int = Field(32, ge=4, le=512, description="channels of the first stage")
    depth: tuple[int, ...] = Field((2, 2, 2), description="residual blocks per stage")

    @field_validator("depth")
    @classmethod
    def _depth(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if not 1 <= len(value) <= 5 or any(d < 1 or d > 8 for d in value):
            raise ValueError("expected 1 to 5 stages of 1 to 8 blocks each")
        return value


class ModelParams(Section):
    teacher: TeacherParams = TeacherParams()
    student: StudentParams = StudentParams()


# ----------------------------------------------------------------------- training


class EngineParams(Section):
    """Knobs of the shared training engine; device and precision are picked automatically."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: Literal["auto", "bf16", "off"] = Field(
        "auto", description="auto: bf16 on CUDA and on CPUs with bf16 instructions")
    channels_last: Literal["auto", "on", "off"] = "auto"
    compile: Literal["auto"] | bool = Field(
        "auto", description="torch.compile the model, the augmentation and the loss; auto: on "
        "CUDA (where it pays), eager on the CPU (compiling costs more than it saves there)")
    deterministic: bool = Field(False, description="bit-reproducible runs (CPU)")
    data_on_device: Literal["auto", "always", "never"] = "auto"
    checkpoint_every_minutes: float = Field(
        5.0, ge=0, le=24 * 60, description="a mid-training checkpoint once this much time has "
        "passed since the last one (0: none by time); one is always written at the end")
    checkpoint_every_steps: int = Field(
        0, ge=0, description="also one every N optimizer steps (0: off; tests that kill a run "
        "mid-way set it small)")
    log_every_steps: int = Field(10, ge=1)


class OptimParams(Section):
    optimizer: Literal["sgd", "adamw", "lars"] = "sgd"
    lr: float = Field(0.1, gt=0, le=100)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = True
    weight_decay: float = Field(5e-4, ge=0, le=1)
    schedule: Literal["cosine", "onecycle", "constant"] = "cosine"
    warmup_epochs: float = Field(1.0, ge=0)


class PretrainParams(Section):
    epochs: int = Field(8, ge=1, le=10_000)
    batch_size: int = Field(128, ge=2, le=65_536)
    accumulate: int = Field(1, ge=1, le=1024)
    min_steps: int = Field(
        300, ge=0, le=10_000_000,
        description="train at least this many optimizer steps (epochs are raised to reach it);"
                    " contrastive features need a few hundred steps whatever the data size")
    optim: OptimParams = OptimParams(optimizer="sgd", lr=0.5, weight_decay=5e-4)
    temperature: float = Field(0.2, gt=0, le=10)
    projection_dim: int = Field(128, ge=8, le=4096)
    projection_hidden: int = Field(512, ge=8, le=8192)
    knn_k: int = Field(20, ge=1, le=1000)
    knn_every: int = Field(4, ge=1, description="kNN monitor every N epochs (and the last)")


class FinetuneParams(Section):
    mode: Literal["full", "linear", "lpft"] = Field(
        "lpft", description="full: all layers; linear: the head on frozen features; lpft: "
        "the head fitted on frozen features first, then all layers (the scratch baseline "
        "always trains in full)")
    epochs: int = Field(30, ge=1, le=10_000)
    batch_size: int = Field(32, ge=1, le=65_536)
    accumulate: int = Field(1, ge=1, le=1024)
    min_steps: int = Field(
        0, ge=0, le=10_000_000,
        description="train at least this many optimizer steps (epochs are raised to reach it)")
    optim: OptimParams = OptimParams(lr=0.05)
    backbone_lr_scale: float = Field(
        0.1, gt=0, le=1, description="backbone lr = lr * scale in full and lpft modes "
        "(pretrained init only; the scratch baseline trains every layer at lr)"
    )
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    eval_every: int = Field(1, ge=1, description="validate every N epochs (and the last)")


class DistillParams(Section):
    epochs: int = Field(20, ge=1, le=10_000)
    batch_size: int = Field(128, ge=1, le=65_536)
    accumulate: int = Field(1, ge=1, le=1024)
    min_steps: int = Field(
        100, ge=0, le=10_000_000,
        description="train at least this many optimizer steps (epochs are raised to reach it)")
    optim: OptimParams = OptimParams(lr=0.05)
    temperature: float = Field(4.0, gt=0, le=100)
    alpha: Probability = Field(0.7, description="weight of the KD term on labeled images")
    use_unlabeled: bool = Field(True, description="add the unlabeled pool with the KD term alone")
    eval_every: int = Field(1, ge=1)


# ------------------------------------------------------------------ compression


class PruneParams(Section):
    """Structured channel pruning of the distilled student, then a recovery distillation."""

    ratio: float = Field(0.5, ge=0.0, lt=1.0, description="share of every prunable layer's "
                         "channels removed by L2 magnitude (0: the stage copies the student)")
    epochs: int = Field(10, ge=1, le=10_000, description="recovery distillation")
    min_steps: int = Field(100, ge=0, le=10_000_000)
    batch_size: int = Field(128, ge=1, le=65_536)
    accumulate: int = Field(1, ge=1, le=1024)
    optim: OptimParams = OptimParams(lr=0.02)
    temperature: float = Field(4.0, gt=0, le=100)
    alpha: Probability = Field(0.7, description="weight of the KD term on labeled images")
    eval_every: int = Field(1, ge=1)


class QuantizeParams(Section):
    calibration_images: int = Field(512, ge=1, le=1_000_000)
    calibration_batch: int = Field(64, ge=1, le=4096)
    qat_if_drop_above: float = Field(
        1.0, ge=0, description="run quantization-aware fine-tuning if PTQ loses more points"
    )
    qat_epochs: int = Field(2, ge=1, le=100)
    qat_lr: float = Field(1e-3, gt=0)
    qat_batch_size: int = Field(64, ge=2, le=65_536)
    reduce_range: bool = Field(
        False, description="7-bit activations: avoids int16 saturation on x86 CPUs without VNNI"
    )


# -------------------------------------------------------------------- evaluation


class CorruptionParams(Section):
    gaussian_noise_std: float = Field(0.08, ge=0, le=1, description="std on the 0..1 scale")
    blur_sigma: float = Field(1.0, ge=0, le=10)
    jpeg_quality: int = Field(30, ge=1, le=100)
    brightness: float = Field(0.4, ge=0, le=1, description="added on the 0..1 scale")
    contrast: float = Field(0.4, gt=0, le=1, description="contrast factor (lower is harsher)")


class LatencyParams(Section):
    threads: int = Field(1, ge=1, le=256, description="CPU threads for latency numbers")
    warmup: int = Field(10, ge=0)
    iterations: int = Field(100, ge=5)
    throughput_batch: int = Field(256, ge=1)
    throughput_iterations: int = Field(10, ge=1, description="timed batches for throughput")


class BootstrapParams(Section):
    resamples: int = Field(1000, ge=100, le=100_000, description="test-set resamples")
    level: float = Field(0.95, gt=0.5, lt=1.0, description="interval coverage")
    seed: int = Field(0, ge=0, description="fixed, so every run is scored on the same resamples")


class EvaluateParams(Section):
    calibration_bins: int = Field(15, ge=2, le=100)
    batch_size: int = Field(
        256, ge=1, le=65_536, description="prediction batch; fixed, so compiled models compile once"
    )
    corruptions: CorruptionParams = CorruptionParams()
    latency: LatencyParams = LatencyParams()
    bootstrap: BootstrapParams = BootstrapParams()


class GateParams(Section):
    min_accuracy: Probability = 0.8
    max_drop_vs_teacher: float = Field(0.05, ge=0, le=1, description="accuracy points as 0..1")
    max_latency_ms: float = Field(50.0, gt=0, description="batch-1 p50 CPU latency")


class RegistryParams(Section):
    student_name: str = Field("refinery-student-int8", min_length=1)
    teacher_name: str = Field("refinery-teacher", min_length=1)
    gate: GateParams = GateParams()


class TrackingParams(Section):
    experiment: str = Field("refinery", min_length=1)
    on_unreachable: Literal["fail", "defer"] = Field(
        "fail", description="fail fast, or run and keep the logs to send later"
    )
    system_metrics_s: float = Field(5.0, ge=0.5, le=3600, description=(
        "training stages sample CPU, memory and GPU (with NVML) into their MLflow run "
        "this often, in seconds"))


# -------------------------------------------------------------------------- root


class Params(Section):
    seed: int = Field(0, ge=0, le=2**31 - 1, description="training: init, batch order, views")
    data_seed: int = Field(0, ge=0, le=2**31 - 1, description=(
        "data: test split, train/val split, labeled subset, evaluation noise; separate from "
        "seed, so training seeds reuse the data stages"))
    download: DownloadParams = DownloadParams()
    images: ImageParams = ImageParams()
    validate_: ValidateParams = Field(ValidateParams(), alias="validate")
    prepare: PrepareParams = PrepareParams()
    augment: AugmentParams = AugmentParams()
    model: ModelParams = ModelParams()
    engine: EngineParams = EngineParams()
    pretrain: PretrainParams = PretrainParams()
    finetune: FinetuneParams = FinetuneParams()
    distill: DistillParams = DistillParams()
    prune: PruneParams = PruneParams()
    quantize: QuantizeParams = QuantizeParams()
    evaluate: EvaluateParams = EvaluateParams()
    registry: RegistryParams = RegistryParams()
    tracking: TrackingParams = TrackingParams()

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @property
    def validate_params(self) -> ValidateParams:
        return self.validate_

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)


def _describe(error: dict[str, Any]) -> str:
    key = ".".join(str(part) for part in error["loc"]) or "<root>"
    kind = error["type"]
    if kind == "extra_forbidden":
        return f"{key}: unknown key (check the spelling against params.yaml's documented keys)"
    if kind == "missing":
        return f"{key}: required key is missing"
    message = re.sub(r"^Value error, ", "", error["msg"])
    field = re.match(r"^([a-z_]+): (.*)$", message, flags=re.S)
    if field and error["type"] == "value_error":  # a cross-field check naming its field
        key = f"{key}.{field.group(1)}" if key != "<root>" else field.group(1)
        message = field.group(2)
    shown = error.get("input")
    if isinstance(shown, dict | list):
        return f"{key}: {message}"
    return f"{key}: {message} (got {shown!r})"


def parse_params(raw: dict[str, Any] | None, source: str = "params") -> Params:
    """Validate a params mapping; raise :class:`ParamsError` naming every bad key."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        kind = type(raw).__name__
        raise ParamsError(f"{source}: expected a mapping of params groups, got {kind}")
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        lines = [_describe(err) for err in exc.errors()]
        raise ParamsError(f"{source} is invalid:\n  " + "\n  ".join(lines)) from None


def load_params(path: str | Path = DEFAULT_PARAMS_FILE) -> Params:
    """Read and validate a params file (YAML)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ParamsError(f"{path}: params file not found") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML: {exc}") from None
    return parse_params(raw, source=str(path))


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Return a copy of ``raw`` with dotted-key overrides (``{"finetune.epochs": 3}``) applied."""
    import copy

    result = copy.deepcopy(raw)
    for dotted, value in overrides.items():
        node = result
        parts = dotted.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ParamsError(f"{dotted}: '{part}' is not a group of params")
            node = child
        node[parts[-1]] = value
    return result


def flatten(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """The inverse of :func:`apply_overrides`' keys, ``{"a": {"b": 1}}`` -> ``{"a.b": 1}``:
    the one name a value has in overrides, profiles, MLflow params and metrics, reports.
    Lists and tuples stay values."""
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, prefix=f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
