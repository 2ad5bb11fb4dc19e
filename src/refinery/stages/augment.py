"""The ``augment`` stage: resolve the policies against the prepared data, save, preview.

It trains nothing. It turns ``params.augment`` into the two policies the
training stages use, checked against the real image size and channel count
(a setting that cannot work on this data stops the pipeline here, naming the
key, instead of silently degrading every batch later), and writes::

    data/augment/
      policies.json   the resolved policies; training reads them with load_policies()
      preview.png     originals beside supervised and SSL views, one labelled row per image
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from refinery import fsutil, paths, stage
from refinery.augment import autoaugment
from refinery.augment.batch import box_fit_fraction
from refinery.augment.preview import pick_rows, render
from refinery.augment.selfsup import SslPolicy
from refinery.augment.supervised import (
    ERASING_RATIO,
    ERASING_SCALE,
    RESIZED_RATIO,
    SupervisedPolicy,
)
from refinery.formats.policies import POLICIES_FILE, PolicyError, policies_document
from refinery.formats.prepared import load_split
from refinery.params import AugmentParams, Params
from refinery.pipeline import stage_named

log = logging.getLogger(__name__)

PREVIEW_FILE = "preview.png"
TIMING_BATCH = 512




@dataclass(frozen=True)
class AugmentResult:
    """What the stage produced; ``metrics()`` goes to ``metrics/augment.json`` and MLflow."""

    policies_path: Path
    preview_path: Path
    supervised: SupervisedPolicy
    ssl: SslPolicy
    supervised_change: float  # mean |augmented - original| on the timing batch, 0..1 scale
    ssl_view_gap: float  # mean |view 1 - view 2| on the timing batch, 0..1 scale
    supervised_images_per_s: float  # on this stage's CPU, sample + apply
    ssl_pairs_per_s: float
    seconds: float

    def metrics(self) -> dict[str, float]:
        return {
            "supervised_change": self.supervised_change,
            "ssl_view_gap": self.ssl_view_gap,
            "supervised_images_per_s_cpu": self.supervised_images_per_s,
            "ssl_pairs_per_s_cpu": self.ssl_pairs_per_s,
            "seconds": self.seconds,
        }


# ------------------------------------------------------------------ resolution


def _crop_problem(key: str, size: int, scale: tuple[float, float],
                  ratio: tuple[float, float]) -> str | None:
    share = box_fit_fraction(size, size, scale, ratio)
    if share == 0.0:
        return (f"{key}: no crop with scale {list(scale)} and aspect ratio "
                f"[{ratio[0]:.3g}, {ratio[1]:.3g}] fits a {size}x{size} image (every side "
                "rounds to 0 px or exceeds the image); raise the scale")
    if share < 0.25:
        log.warning("%s: only %.0f%% of the crop range fits %dx%d images; the rest falls back "
                    "to the central crop", key, 100 * share, size, size)
    return None


#: The ``auto`` SSL views on 1-channel images. SimCLR's colour jitter and grayscale
#: have little or nothing to change on them, so the two views of a gray image would
#: differ by crop alone; a small rotation and pixel noise make them differ in what
#: does not change the class. RGB images keep SimCLR's policy (0 for both).
GRAY_ROTATE_DEG = 15.0
GRAY_NOISE_STD = 0.05


def _by_channels(value: float | str, channels: int, *, gray: float) -> float:
    if value != "auto":
        return float(value)
    return gray if channels == 1 else 0.0


def resolve(p: AugmentParams, meta: dict[str, Any]) -> tuple[SupervisedPolicy, SslPolicy]:
    """Build both policies for the prepared data's ``meta``; :class:`PolicyError` if impossible."""
    size, channels = int(meta["size"]), int(meta["channels"])
    classes = list(meta["classes"])
    mean = [float(m) for m in meta["mean"]]
    if channels not in (1, 3) or len(mean) != channels:
        raise PolicyError(f"prepared meta.json: expected 1 or 3 channels with one mean each, "
                          f"got channels={channels}, mean={mean}")
    s, v = p.supervised, p.ssl
    problems: list[str] = []
    if s.crop == "translate" and s.translate_px >= size:
        problems.append(f"augment.supervised.translate_px: a {s.translate_px} px shift is not "
                        f"smaller than the {size} px images (at most {size - 1})")
    if s.crop == "resized":
        problems.append(_crop_problem("augment.supervised.resized_scale", size,
                                      s.resized_scale, RESIZED_RATIO))
    if s.erasing_p > 0 and box_fit_fraction(size, size, ERASING_SCALE, ERASING_RATIO,
                                            side_from_ratio="height") == 0.0:
        problems.append(f"augment.supervised.erasing_p: no erasing box fits a {size} px image")
    problems.append(_crop_problem("augment.ssl.crop_scale (with crop_ratio)", size,
                                  v.crop_scale, v.crop_ratio))
    if v.blur_p > 0 and v.blur_kernel // 2 >= size:
        problems.append(f"augment.ssl.blur_kernel: a {v.blur_kernel} px kernel needs images of "
                        f"more than {v.blur_kernel // 2} px (reflect padding), got {size} px")
    problems = [line for line in problems if line]
    if problems:
        raise PolicyError("augment params cannot work on the prepared images:\n  "
                          + "\n  ".join(problems))
    if s.auto == "trivialaugment":
        reach = autoaugment.max_translate_px("trivialaugment", size, size)
        if reach >= size:
            log.warning("augment.supervised.auto: TrivialAugmentWide translates up to %d px, "
                        "which can shift a %d px image out of view (torchvision's fixed range)",
                        reach, size)
    supervised = SupervisedPolicy(
        size=size, channels=channels, num_classes=len(classes), crop=s.crop,
        translate_px=s.translate_px, translate_padding=s.translate_padding,
        resized_scale=s.resized_scale, flip=s.flip, auto=s.auto, auto_layers=s.randaugment_ops,
        auto_magnitude=s.randaugment_magnitude, erasing_p=s.erasing_p,
        # erasing fills with the train mean: what torchvision's value=0 means after Normalize
        erasing_value=tuple(mean), mixup_alpha=s.mixup_alpha, cutmix_alpha=s.cutmix_alpha,
    )
    ssl = SslPolicy(
        size=size, channels=channels, crop_scale=v.crop_scale, crop_ratio=v.crop_ratio,
        flip=v.flip, jitter_p=v.jitter_p, brightness=v.brightness, contrast=v.contrast,
        saturation=v.saturation, hue=v.hue, grayscale_p=v.grayscale_p, blur_p=v.blur_p,
        blur_kernel=v.blur_kernel, blur_sigma=v.blur_sigma,
        rotate_deg=_by_channels(v.rotate_deg, channels, gray=GRAY_ROTATE_DEG),
        noise_std=_by_channels(v.noise_std, channels, gray=GRAY_NOISE_STD),
    )
    return supervised, ssl


# ----------------------------------------------------------------------- stage


def _throughput(fn: Any, count: int, repeats: int = 3) -> float:
    """Items per second of ``fn()`` (best of ``repeats`` after one warm-up)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return count / best


def augment(p: AugmentParams, *, prepared_dir: Path, out_dir: Path, seed: int) -> AugmentResult:
    """Resolve, check and save the policies, and render the preview grid."""
    start = time.perf_counter()
    prepared_dir, out_dir = Path(prepared_dir), Path(out_dir)
    meta = json.loads((prepared_dir / "meta.json").read_text())
    supervised, ssl = resolve(p, meta)
    train = load_split(prepared_dir / "train.pt")
    if len(train) == 0:
        raise PolicyError(f"{prepared_dir / 'train.pt'}: the train split is empty")

    generator = torch.Generator().manual_seed(seed)
    batch = train.images[:TIMING_BATCH]
    original = batch.to(torch.float32) / 255.0
    augmented = supervised.apply(batch, supervised.sample(len(batch), generator))
    first, second = ssl(batch, generator)
    sup_rate = _throughput(lambda: supervised.apply(batch, supervised.sample(len(batch),
                                                                             generator)),
                           len(batch))
    ssl_rate = _throughput(lambda: ssl(batch, generator), len(batch))

    rows = pick_rows(train.labels, p.preview_images, len(meta["classes"]))
    captions = [str(meta["classes"][int(train.labels[i])]) for i in rows]
    with fsutil.atomic_dir(out_dir) as tmp:
        fsutil.write_json(tmp / POLICIES_FILE, policies_document(supervised, ssl))
        render(supervised, ssl, train.images[rows], captions,
               torch.Generator().manual_seed(seed), tmp / PREVIEW_FILE)
    return AugmentResult(
        policies_path=out_dir / POLICIES_FILE,
        preview_path=out_dir / PREVIEW_FILE,
        supervised=supervised,
        ssl=ssl,
        supervised_change=float((augmented - original).abs().mean()),
        ssl_view_gap=float((first - second).abs().mean()),
        supervised_images_per_s=sup_rate,
        ssl_pairs_per_s=ssl_rate,
        seconds=time.perf_counter() - start,
    )


def main(params: Params, args: argparse.Namespace) -> None:
    """The adapter (:mod:`refinery.stage`): ``python -m refinery augment``."""
    declared = stage_named("augment")
    with stage.tracked(declared, params) as run:
        result = augment(params.augment, prepared_dir=paths.PREPARED, out_dir=paths.AUGMENT,
                         seed=params.data_seed)
        stage.finish(declared, run, result.metrics(),
                     artifacts=[result.policies_path, result.preview_path])
