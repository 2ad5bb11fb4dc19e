"""The batched augmentations against torchvision v2, image by image, and the augment stage.

Every batched op gets a batch with a different parameter per image and must
return what ``torchvision.transforms.v2.functional`` returns for each image
called alone with that image's parameter. Exact where the arithmetic is the
same; ``atol`` 1e-6 where torchvision blends with a fused multiply-add or
convolves with the 2-D outer-product kernel (one float rounding apart);
2e-6 for hue, which is the same map written in the chroma form (see
``functional.adjust_hue``); 1e-5 for whole pipelines of such ops.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import re
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.profiler import ProfilerActivity, profile
from torchvision.transforms.v2 import InterpolationMode, RandAugment
from torchvision.transforms.v2 import functional as F

from refinery.augment import SslPolicy, SupervisedPolicy, autoaugment
from refinery.augment import functional as A
from refinery.augment.batch import Draw
from refinery.formats.policies import PolicyError, load_policies
from refinery.formats.prepared import Split, save_split
from refinery.params import (
    AugmentParams,
    ParamsError,
    SslAugParams,
    SupervisedAugParams,
    parse_params,
)
from refinery.stages.augment import augment, resolve

S = 16  # image side in most tests


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small batches: one thread is faster than two fighting over a shared CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def per_image(fn, images: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
    """torchvision called on each image alone with its own parameters (as Python numbers)."""
    return torch.stack([fn(img, *(p[i].tolist() for p in params))
                        for i, img in enumerate(images)])


@pytest.fixture(params=[3, 1], ids=["rgb", "gray"])
def images(request: pytest.FixtureRequest) -> torch.Tensor:
    x = torch.rand(12, request.param, S, S, generator=gen(1))
    x[0] = 0.5  # a flat image (autocontrast, equalize, hue edge cases)
    x[1, :, :4] = 1.0  # saturated pixels
    return x


@pytest.fixture(params=[True, False], ids=["cpu-subsets", "whole-batch"])
def selection(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    """Run with both ways of applying an op to some images (CPU subset / accelerator where)."""
    monkeypatch.setattr(A, "SUBSETS_ON_CPU", request.param)
    return request.param


# --------------------------------------------------------------- single ops


def test_colour_ops_match_torchvision(images: torch.Tensor) -> None:
    g = gen(2)
    n = len(images)
    factor = torch.rand(n, generator=g) * 1.9 + 0.05
    hue = torch.rand(n, generator=g) - 0.5
    bits = torch.randint(0, 9, (n,), generator=g)
    threshold = torch.rand(n, generator=g)
    sigma = torch.rand(n, generator=g) * 2 + 0.1
    cases = [
        (A.adjust_brightness(images, factor), per_image(F.adjust_brightness, images, factor), 0),
        (A.adjust_contrast(images, factor), per_image(F.adjust_contrast, images, factor), 1e-6),
        (A.adjust_saturation(images, factor), per_image(F.adjust_saturation, images, factor),
         1e-6),
        (A.adjust_sharpness(images, factor), per_image(F.adjust_sharpness, images, factor),
         1e-6),
        (A.adjust_hue(images, hue), per_image(F.adjust_hue, images, hue), 2e-6),
        (A.posterize(images, bits), per_image(F.posterize, images, bits), 0),
        (A.solarize(images, threshold), per_image(F.solarize, images, threshold), 0),
        (A.autocontrast(images), per_image(F.autocontrast, images), 0),
        (A.equalize(images), per_image(F.equalize, images), 0),
        (A.gaussian_blur(images, 5, sigma),
         per_image(lambda img, s: F.gaussian_blur(img, [5, 5], [s, s]), images, sigma), 1e-6),
    ]
    for got, want, atol in cases:
        assert got.shape == want.shape and got.dtype == torch.float32
        torch.testing.assert_close(got, want, atol=atol, rtol=0)


def test_grayscale_and_erase_match_torchvision(images: torch.Tensor, selection: bool) -> None:
    g = gen(3)
    n, c = images.shape[:2]
    gray = torch.rand(n, generator=g) < 0.5
    want = torch.stack([F.rgb_to_grayscale(img, num_output_channels=c) if m else img
                        for img, m in zip(images, gray, strict=True)])
    assert torch.equal(A.grayscale(images, gray), want)

    top, left = torch.randint(0, S, (n,), generator=g), torch.randint(0, S, (n,), generator=g)
    h, w = torch.randint(0, S, (n,), generator=g), torch.randint(0, S, (n,), generator=g)
    apply = torch.rand(n, generator=g) < 0.7
    value = torch.rand(c, generator=g)
    want = torch.stack([
        F.erase(img, int(top[i]), int(left[i]), int(h[i]), int(w[i]), value.reshape(c, 1, 1))
        if apply[i] else img for i, img in enumerate(images)])
    assert torch.equal(A.erase(images, top, left, h, w, value, apply), want)


@pytest.mark.parametrize("padding", ["reflect", "zeros"])
def test_translate_is_pad_crop_flip(images: torch.Tensor, padding: str) -> None:
    g, p, n = gen(4), S - 1, len(images)
    dy, dx = torch.randint(-p, p + 1, (n,), generator=g), torch.randint(-p, p + 1, (n,),
                                                                        generator=g)
    flip = torch.rand(n, generator=g) < 0.5
    mode = "reflect" if padding == "reflect" else "constant"

    def reference(img: torch.Tensor, y: int, x: int, f: bool) -> torch.Tensor:
        out = F.crop(F.pad(img, [p], padding_mode=mode), p + y, p + x, S, S)
        return F.horizontal_flip(out) if f else out

    assert torch.equal(A.translate(images, dy, dx, flip, padding),
                       per_image(reference, images, dy, dx, flip))


def test_resized_crop_is_torchvisions(images: torch.Tensor) -> None:
    g, n = gen(5), len(images)
    h, w = torch.randint(1, S + 1, (n,), generator=g), torch.randint(1, S + 1, (n,), generator=g)
    top = (torch.rand(n, generator=g) * (S - h + 1)).long()
    left = (torch.rand(n, generator=g) * (S - w + 1)).long()
    flip = torch.rand(n, generator=g) < 0.5

    def reference(img, t, lft, hh, ww, f):
        out = F.resized_crop(img, t, lft, hh, ww, [S, S], antialias=True)
        return F.horizontal_flip(out) if f else out

    # bilinear with antialias; crops are never larger than the output, so antialiasing is a
    # no-op and only the summation order differs
    torch.testing.assert_close(A.resized_crop(images, top, left, h, w, flip),
                               per_image(reference, images, top, left, h, w, flip),
                               atol=1e-6, rtol=0)


@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
def test_affine_matches_torchvision(images: torch.Tensor, mode: str) -> None:
    g, n = gen(6), len(images)
    angle = torch.rand(n, generator=g) * 360 - 180
    shear = torch.rand(n, 2, generator=g) * 60 - 30
    shift = torch.randint(-6, 7, (n, 2), generator=g).double()
    corner = torch.rand(n, generator=g) < 0.5  # about the top-left corner or the center
    center = torch.where(corner.reshape(-1, 1), torch.tensor([-S / 2, -S / 2]), torch.zeros(2))
    matrix = A.inverse_affine_matrix(center, angle, shift, torch.ones(n), shear)
    interpolation = InterpolationMode(mode)
    want = torch.stack([
        F.affine(img, float(angle[i]), shift[i].tolist(), 1.0, shear[i].tolist(),
                 interpolation=interpolation, center=[0, 0] if corner[i] else None)
        for i, img in enumerate(images)])
    # the batch's sampling grid comes from one matrix product instead of one bmm per image:
    # coordinates can differ in the last float bit, which nearest sampling never sees and
    # bilinear weights turn into ~1e-6
    atol = 0.0 if mode == "nearest" else 1e-5
    torch.testing.assert_close(A.affine(images, matrix, mode), want, atol=atol, rtol=0)
    rotated = torch.stack([F.rotate(img, float(a)) for img, a in zip(images, angle, strict=True)])
    rotation = A.inverse_affine_matrix(torch.zeros(n, 2), -(angle % 360), torch.zeros(n, 2),
                                       torch.ones(n), torch.zeros(n, 2))
    assert torch.equal(A.affine(images, rotation), rotated)


# ------------------------------------------------------------- auto-augment


@pytest.mark.parametrize("kind", ["randaugment", "trivialaugment"])
def test_every_auto_op_matches_torchvision(images: torch.Tensor, kind: str,
                                           selection: bool) -> None:
    """Each of the 14 ops at several magnitudes (both signs) in one batch vs torchvision's op."""
    c = images.shape[1]
    table = autoaugment._table(kind, S, S, torch.device("cpu"))
    ops, mags = [], []
    for op in range(len(autoaugment.OPS)):
        for bin_, sign in ((0, 1), (9, -1), (20, 1), (30, -1)):
            ops.append(op)
            mag = float(table[op, bin_])
            mags.append(-mag if sign < 0 and autoaugment.OPS[op] in autoaugment.SIGNED else mag)
    n = len(ops)
    batch = images[torch.arange(n) % len(images)]
    got = autoaugment.apply_layer(batch, torch.tensor(ops), torch.tensor(mags))
    tv = RandAugment()  # only its op dispatcher is used: torchvision's definition of each op
    want = torch.stack([
        tv._apply_image_or_video_transform(img, autoaugment.OPS[ops[i]], mags[i],
                                           interpolation=InterpolationMode.NEAREST,
                                           fill=tv._fill)
        for i, img in enumerate(batch)])
    assert got.shape == (n, c, S, S)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_auto_sampling_follows_torchvision() -> None:
    draw = Draw(gen(7), "cpu")
    ops, mags = autoaugment.sample(draw, 4000, "randaugment", 2, 9, 32, 32)
    assert ops.shape == mags.shape == (4000, 2)
    counts = torch.bincount(ops.flatten(), minlength=14).double()
    assert counts.min() > 0.8 * 8000 / 14  # uniform over the 14 ops
    rotate = mags[ops == autoaugment.OP_INDEX["Rotate"]]
    assert set(rotate.abs().tolist()) == {9.0} and (rotate < 0).any() and (rotate > 0).any()
    ops, mags = autoaugment.sample(draw, 4000, "trivialaugment", 1, None, 32, 32)
    assert len(set(mags[ops == autoaugment.OP_INDEX["Rotate"]].abs().tolist())) == 31


# ------------------------------------------------------------------ policies


def ssl_reference(policy: SslPolicy, images: torch.Tensor, p) -> torch.Tensor:
    """SimCLR's torchvision pipeline on each image alone, with that image's parameters."""
    c = images.shape[1]
    out = []
    for i, img in enumerate(images):
        x = F.resized_crop(img, int(p.top[i]), int(p.left[i]), int(p.height[i]),
                           int(p.width[i]), [policy.size, policy.size], antialias=True)
        if p.flip[i]:
            x = F.horizontal_flip(x)
        if p.jitter[i]:
            for k in p.order[i].tolist():
                if k == 0 and policy.brightness:
                    x = F.adjust_brightness(x, float(p.brightness[i]))
                elif k == 1 and policy.contrast:
                    x = F.adjust_contrast(x, float(p.contrast[i]))
                elif k == 2 and policy.saturation:
                    x = F.adjust_saturation(x, float(p.saturation[i]))
                elif k == 3 and policy.hue:
                    x = F.adjust_hue(x, float(p.hue[i]))
        if p.gray[i]:
            x = F.rgb_to_grayscale(x, num_output_channels=c)
        if p.blur[i] and policy.blur_p > 0:
            s = float(p.sigma[i])
            x = F.gaussian_blur(x, [policy.blur_kernel] * 2, [s, s])
        if policy.rotate_deg > 0:  # RandomAffine(degrees=rotate_deg), bilinear, zeros outside
            x = F.affine(x, angle=float(p.angle[i]), translate=[0, 0], scale=1.0,
                         shear=[0.0, 0.0], interpolation=InterpolationMode.BILINEAR)
        if policy.noise_std > 0:
            x = (x + policy.noise_std * p.noise[i]).clamp(0.0, 1.0)
        out.append(x)
    return torch.stack(out)


def ssl_policy(channels: int, **kw) -> SslPolicy:
    kw = {"flip": True, "blur_p": 0.5, "blur_kernel": 5, "jitter_p": 0.8, **kw}
    return SslPolicy(size=S, channels=channels, **kw)


def sup_policy(channels: int, **kw) -> SupervisedPolicy:
    kw = {"translate_px": 3, "flip": True, "auto": "randaugment", "erasing_p": 0.5,
          "erasing_value": (0.25,) * channels, **kw}
    return SupervisedPolicy(size=S, channels=channels, num_classes=5, **kw)


def test_ssl_views_are_simclr_per_image(images: torch.Tensor, selection: bool) -> None:
    policy = ssl_policy(images.shape[1])
    params = policy.sample(len(images), gen(8))
    first, second = policy.apply(images, params)
    torch.testing.assert_close(first, ssl_reference(policy, images, params.first),
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(second, ssl_reference(policy, images, params.second),
                               atol=1e-5, rtol=0)


def test_ssl_rotation_and_noise_are_torchvisions_affine_plus_noise(images: torch.Tensor,
                                                                  selection: bool) -> None:
    policy = ssl_policy(images.shape[1], rotate_deg=30.0, noise_std=0.1)
    params = policy.sample(len(images), gen(9))
    assert params.first.angle.abs().max() <= 30.0 and params.first.angle.std() > 5.0
    first, second = policy.apply(images, params)
    torch.testing.assert_close(first, ssl_reference(policy, images, params.first),
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(second, ssl_reference(policy, images, params.second),
                               atol=1e-5, rtol=0)


def test_gray_images_get_rotation_and_noise_by_default_rgb_keeps_simclrs_views() -> None:
    for channels, rotation, noise in ((1, 15.0, 0.05), (3, 0.0, 0.0)):
        meta = {"size": 8, "channels": channels, "classes": ["a", "b"], "mean": [0.5] * channels}
        _, ssl = resolve(AugmentParams(), meta)
        assert (ssl.rotate_deg, ssl.noise_std) == (rotation, noise)
    meta = {"size": 8, "channels": 1, "classes": ["a", "b"], "mean": [0.5]}
    _, ssl = resolve(AugmentParams(ssl={"rotate_deg": 5, "noise_std": 0}), meta)
    assert (ssl.rotate_deg, ssl.noise_std) == (5.0, 0.0)
    with pytest.raises(ParamsError, match=r"augment\.ssl\.rotate_deg"):
        parse_params({"augment": {"ssl": {"rotate_deg": 200}}})


@pytest.mark.parametrize("crop", ["translate", "resized"])
def test_supervised_is_torchvision_per_image(images: torch.Tensor, crop: str,
                                             selection: bool) -> None:
    c = images.shape[1]
    policy = sup_policy(c, crop=crop, translate_padding="zeros")
    p = policy.sample(len(images), gen(9))
    tv = RandAugment()
    want = []
    for i, img in enumerate(images):
        if crop == "translate":
            pad = policy.translate_px
            x = F.crop(F.pad(img, [pad]), pad + int(p.shift.dy[i]), pad + int(p.shift.dx[i]),
                       S, S)
        else:
            x = F.resized_crop(img, int(p.box.top[i]), int(p.box.left[i]),
                               int(p.box.height[i]), int(p.box.width[i]), [S, S])
        if p.flip[i]:
            x = F.horizontal_flip(x)
        for op, mag in zip(p.auto.ops[i].tolist(), p.auto.magnitudes[i].tolist(), strict=True):
            x = tv._apply_image_or_video_transform(x, autoaugment.OPS[op], mag,
                                                   interpolation=InterpolationMode.NEAREST,
                                                   fill=tv._fill)
        if p.erase.apply[i]:
            b = p.erase.box
            x = F.erase(x, int(b.top[i]), int(b.left[i]), int(b.height[i]), int(b.width[i]),
                        torch.full((c, 1, 1), 0.25))
        want.append(x)
    torch.testing.assert_close(policy.apply(images, p), torch.stack(want), atol=1e-5, rtol=0)


def test_randomness_is_per_image_and_follows_the_generator() -> None:
    same = torch.rand(1, 3, S, S, generator=gen(10)).expand(32, 3, S, S)
    sup = sup_policy(3, auto="none", erasing_p=0.0)
    out = sup.apply(same, sup.sample(32, gen(11)))
    assert len({o.numpy().tobytes() for o in out}) > 16  # different shifts/flips in one batch
    params = sup.sample(32, gen(11))
    assert len(set(params.shift.dy.tolist())) > 3 and 0 < int(params.flip.sum()) < 32

    ssl = ssl_policy(3)
    a1, b1 = ssl(same, gen(12))
    a2, b2 = ssl(same, gen(12))
    a3, _ = ssl(same, gen(13))
    assert torch.equal(a1, a2) and torch.equal(b1, b2)  # same generator state, same views
    assert not torch.equal(a1, a3)  # another seed, other views
    assert not torch.equal(a1, b1)  # two views of an image differ
    assert len({v.numpy().tobytes() for v in a1}) == 32  # every image its own crop/jitter
    p = ssl.sample(32, gen(12)).first
    assert len(set(zip(p.top.tolist(), p.height.tolist(), strict=True))) > 8
    assert len({tuple(o) for o in p.order.tolist()}) > 4  # ColorJitter order per image


@pytest.mark.parametrize("channels", [1, 3])
def test_outputs_are_float_in_unit_range(channels: int) -> None:
    uint8 = torch.randint(0, 256, (20, channels, S, S), generator=gen(14), dtype=torch.uint8)
    as_float = F.to_dtype(uint8, torch.float32, scale=True)  # torchvision's ToDtype
    sup = sup_policy(channels, auto="trivialaugment", mixup_alpha=0.4, cutmix_alpha=1.0)
    params = sup.sample(20, gen(15))
    out = sup.apply(uint8, params)
    assert out.dtype == torch.float32 and out.shape == uint8.shape
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert torch.equal(out, sup.apply(as_float, params))  # uint8 in == its float in
    labels = torch.randint(0, 5, (20,), generator=gen(16))
    mixed, targets = sup.mix(out, labels, params)
    assert mixed.shape == out.shape and 0.0 <= float(mixed.min()) <= float(mixed.max()) <= 1.0
    assert targets.shape == (20, 5)
    torch.testing.assert_close(targets.sum(1), torch.ones(20))
    ssl = ssl_policy(channels)
    for view in ssl(uint8, gen(17)):
        assert view.dtype == torch.float32 and view.shape == uint8.shape
        assert float(view.min()) >= 0.0 and float(view.max()) <= 1.0
    with pytest.raises(ValueError, match="policy is for"):
        ssl(uint8[:, :, :8], gen(0))


@pytest.mark.parametrize("channels", [3, 1])
def test_colour_jitter_in_every_order_is_torchvisions(channels: int, selection: bool) -> None:
    """All 24 orders of the four ops, each image its own factors: the jitter runs each op
    once per image (blends before hue, hue, blends after) and must equal the ops in order."""
    perms = torch.tensor(list(itertools.permutations(range(4))))
    n = 2 * len(perms)
    images = torch.rand(n, channels, S, S, generator=gen(30))
    images[1, :, :4] = 1.0  # saturated pixels
    policy = ssl_policy(channels, brightness=0.8, contrast=0.8, saturation=0.8, hue=0.5,
                        crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip=False,
                        grayscale_p=0.0, blur_p=0.0)
    p = dataclasses.replace(policy.sample_view(n, gen(31)), order=perms.repeat(2, 1),
                            jitter=torch.arange(n) % 7 != 0)  # a few images not jittered
    torch.testing.assert_close(policy.apply_view(images, p), ssl_reference(policy, images, p),
                               atol=1e-5, rtol=0)


def test_ssl_apply_dispatches_a_bounded_number_of_ops(monkeypatch: pytest.MonkeyPatch) -> None:
    """The accelerator's path (whole-batch ops, no host sync) of one SSL ``apply``.

    Measured with torch.profiler at batch 512, 3x32x32, SimCLR defaults + flip:
    481 top-level ATen ops (392 not views) while ColorJitter ran all four ops in
    each of its four order slots (16 full-batch ops); 319 (217) with one blend
    per slot and hue once; 109 (76) of them are not the jitter. The count does
    not depend on the batch or image size.
    """
    monkeypatch.setattr(A, "SUBSETS_ON_CPU", False)
    policy = ssl_policy(3, blur_p=0.0)
    images = torch.randint(0, 256, (32, 3, S, S), generator=gen(32), dtype=torch.uint8)
    params = policy.sample(32, gen(33))
    policy.apply(images, params)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        policy.apply(images, params)
    events = [e for e in prof.events() if e.name.startswith("aten::")]
    dispatched = [e.name for e in events
                  if e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")]
    assert len(dispatched) <= 350, len(dispatched)
    syncing = {"aten::nonzero", "aten::is_nonzero", "aten::_local_scalar_dense", "aten::item"}
    assert not syncing & {e.name for e in events}


def test_ssl_apply_traces_to_one_graph(monkeypatch: pytest.MonkeyPatch) -> None:
    """What ``torch.compile`` of the accelerator path needs: no graph break in ``apply``."""
    monkeypatch.setattr(A, "SUBSETS_ON_CPU", False)
    torch._dynamo.reset()
    policy = ssl_policy(3)
    images = torch.randint(0, 256, (8, 3, S, S), generator=gen(34), dtype=torch.uint8)
    explained = torch._dynamo.explain(policy.apply)(images, policy.sample(8, gen(35)))
    torch._dynamo.reset()
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), \
        explained.break_reasons


def test_autocast_does_not_reach_the_augmentation() -> None:
    """Training steps run under bf16 autocast; the policies must still compute in float32."""
    images = torch.randint(0, 256, (8, 3, S, S), generator=gen(24), dtype=torch.uint8)
    sup = sup_policy(3, auto="trivialaugment", cutmix_alpha=1.0)
    ssl = ssl_policy(3)
    sp, tp = sup.sample(8, gen(25)), ssl.sample(8, gen(26))
    plain = (sup.apply(images, sp), *ssl.apply(images, tp))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = (sup.apply(images, sp), *ssl.apply(images, tp))
    for a, b in zip(plain, under, strict=True):
        assert b.dtype == torch.float32 and torch.equal(a, b)


def test_gray_images_skip_colour_only_ops() -> None:
    gray = torch.rand(16, 1, S, S, generator=gen(18))
    policy = ssl_policy(1, brightness=0.0, contrast=0.0, saturation=0.9, hue=0.5, blur_p=0.0,
                        grayscale_p=1.0, flip=False, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0))
    first, second = policy(gray, gen(19))  # full-image crop, only colour ops left: no change
    assert torch.equal(first, gray) and torch.equal(second, gray)
    color = autoaugment.OP_INDEX["Color"]
    out = autoaugment.apply_layer(gray, torch.full((16,), color), torch.full((16,), 0.9))
    assert torch.equal(out, gray)


@pytest.mark.parametrize("policy_kind", ["supervised", "ssl"])
def test_slices_of_params_give_slices_of_the_batch(policy_kind: str, selection: bool) -> None:
    """The DDP property: a rank applying params[its slice] gets the single-process result."""
    images = torch.randint(0, 256, (16, 3, S, S), generator=gen(20), dtype=torch.uint8)
    labels = torch.randint(0, 5, (16,), generator=gen(21))
    if policy_kind == "ssl":
        policy = ssl_policy(3)
        params = policy.sample(16, gen(22))
        full = policy.apply(images, params)
        for lo, hi in ((0, 8), (8, 16), (4, 10)):
            part = policy.apply(images[lo:hi], params[lo:hi])
            for whole, piece in zip(full, part, strict=True):
                assert torch.equal(piece, whole[lo:hi])
        return
    policy = sup_policy(3, auto="randaugment", mixup_alpha=1.0, cutmix_alpha=1.0)
    params = policy.sample(16, gen(22))
    full_images, full_targets = policy.mix(policy.apply(images, params), labels, params)
    for lo, hi in ((0, 8), (8, 16), (4, 10)):  # even-aligned slices mix the same pairs
        part = params[lo:hi]
        assert torch.equal(part.mix.lam, params.mix.lam)  # per-batch values are kept whole
        out, targets = policy.mix(policy.apply(images[lo:hi], part), labels[lo:hi], part)
        assert torch.equal(out, full_images[lo:hi])
        assert torch.equal(targets, full_targets[lo:hi])


def test_mixup_and_cutmix_follow_torchvision() -> None:
    images = torch.rand(6, 3, S, S, generator=gen(23))
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    partner = torch.tensor([1, 0, 3, 2, 5, 4])
    soft = torch.nn.functional.one_hot(labels, 5).float()
    seen = set()
    for seed in range(12):
        policy = sup_policy(3, auto="none", erasing_p=0.0, mixup_alpha=0.5, cutmix_alpha=1.0)
        p = policy.sample(6, gen(seed))
        out, targets = policy.mix(images, labels, p)
        m = p.mix
        seen.add(bool(m.cutmix))
        if m.cutmix:
            box = torch.zeros(S, S, dtype=torch.bool)
            box[int(m.y1):int(m.y2), int(m.x1):int(m.x2)] = True
            want = torch.where(box, images[partner], images)
            lam = 1.0 - float(box.sum()) / (S * S)
            assert float(m.x2 - m.x1) <= math.ceil(math.sqrt(1 - float(m.lam)) * S)
        else:
            lam = float(m.lam)
            want = images * lam + images[partner] * (1 - lam)
        torch.testing.assert_close(out, want)
        torch.testing.assert_close(targets, soft * lam + soft[partner] * (1 - lam))
    assert seen == {True, False}  # both on: one of the two per batch
    lams = torch.stack([sup_policy(3, auto="none", erasing_p=0.0, mixup_alpha=0.5)
                        .sample(2, gen(s)).mix.lam for s in range(400)])
    assert abs(float(lams.mean()) - 0.5) < 0.05 and float(lams.std()) > 0.3  # Beta(0.5, 0.5)


def test_policies_round_trip_through_json() -> None:
    sup, ssl = sup_policy(3, resized_scale=(0.2, 0.9)), ssl_policy(3)
    again_sup = SupervisedPolicy.from_dict(json.loads(json.dumps(sup.to_dict())))
    again_ssl = SslPolicy.from_dict(json.loads(json.dumps(ssl.to_dict())))
    assert (again_sup, again_ssl) == (sup, ssl)


def test_load_policies_rejects_foreign_files(tmp_path: Path) -> None:
    path = tmp_path / "policies.json"
    path.write_text(json.dumps({"format_version": 99}))
    with pytest.raises(PolicyError, match="format_version 99"):
        load_policies(path)
    path.write_text(json.dumps({"format_version": 1, "supervised": {"size": 8, "bogus": 1},
                                "ssl": {}}))
    with pytest.raises(PolicyError, match="re-run the augment stage"):
        load_policies(path)


# --------------------------------------------------------------------- stage


def write_prepared(root: Path, size: int = 8, channels: int = 1, classes: int = 3) -> Path:
    """A tiny ``data/prepared`` as the prepare stage writes it."""
    root.mkdir(parents=True, exist_ok=True)
    g = gen(30)
    for name, n in (("train", 30), ("val", 6), ("test", 6)):
        images = torch.randint(0, 256, (n, channels, size, size), generator=g, dtype=torch.uint8)
        labels = torch.arange(n) % classes
        save_split(root / f"{name}.pt", Split(images, labels, [f"{name}-{i}" for i in range(n)]))
    torch.save({"indices": torch.arange(0, 30, 3)}, root / "labeled.pt")
    meta = {"classes": [f"class-{i}" for i in range(classes)], "channels": channels,
            "size": size, "mean": [0.5] * channels, "std": [0.29] * channels,
            "counts": {"train": 30, "val": 6, "test": 6}}
    (root / "meta.json").write_text(json.dumps(meta))
    return root


@pytest.mark.parametrize("channels", [1, 3])
def test_stage_writes_policies_and_preview(tmp_path: Path, channels: int) -> None:
    prepared = write_prepared(tmp_path / "prepared", channels=channels)
    params = AugmentParams(
        supervised=SupervisedAugParams(translate_px=2, flip=True, auto="randaugment",
                                       erasing_p=0.3, cutmix_alpha=1.0),
        ssl=SslAugParams(flip=True, blur_p=0.5), preview_images=5)
    result = augment(params, prepared_dir=prepared, out_dir=tmp_path / "augment", seed=3)
    assert result.policies_path == tmp_path / "augment" / "policies.json"
    sup, ssl = load_policies(result.policies_path)
    assert (sup, ssl) == (result.supervised, result.ssl)
    assert load_policies(tmp_path / "augment") == (sup, ssl)
    assert (sup.size, sup.channels, sup.num_classes, ssl.size) == (8, channels, 3, 8)
    assert sup.erasing_value == (0.5,) * channels and sup.cutmix_alpha == 1.0
    with Image.open(result.preview_path) as png:
        assert png.format == "PNG" and png.width > 300 and png.height > 200
    metrics = result.metrics()
    assert all(math.isfinite(v) for v in metrics.values())
    assert 0 < metrics["supervised_change"] < 1 and 0 < metrics["ssl_view_gap"] < 1
    again = augment(params, prepared_dir=prepared, out_dir=tmp_path / "again", seed=3)
    assert again.supervised_change == result.supervised_change  # seeded
    assert (tmp_path / "again" / "policies.json").read_bytes() == \
        result.policies_path.read_bytes()


@pytest.mark.parametrize(("params", "key"), [
    (AugmentParams(supervised=SupervisedAugParams(translate_px=8)),
     "augment.supervised.translate_px"),
    (AugmentParams(supervised=SupervisedAugParams(crop="resized",
                                                  resized_scale=(0.001, 0.002))),
     "augment.supervised.resized_scale"),
    (AugmentParams(ssl=SslAugParams(crop_scale=(0.001, 0.003))), "augment.ssl.crop_scale"),
    (AugmentParams(ssl=SslAugParams(blur_p=0.5, blur_kernel=17)), "augment.ssl.blur_kernel"),
])
def test_stage_rejects_impossible_policies(tmp_path: Path, params: AugmentParams,
                                           key: str) -> None:
    prepared = write_prepared(tmp_path / "prepared")
    with pytest.raises(PolicyError, match=re.escape(key)):
        augment(params, prepared_dir=prepared, out_dir=tmp_path / "augment", seed=0)
    assert not (tmp_path / "augment").exists()


def test_resolve_and_params_schema() -> None:
    meta = {"size": 32, "channels": 3, "classes": list("abcdefghij"), "mean": [0.4, 0.5, 0.6]}
    sup, ssl = resolve(AugmentParams(supervised=SupervisedAugParams(translate_px=4)), meta)
    assert sup.translate_px == 4 and sup.erasing_value == (0.4, 0.5, 0.6) and ssl.size == 32
    with pytest.raises(ParamsError, match=r"augment\.ssl\.blur_kernel"):
        parse_params({"augment": {"ssl": {"blur_kernel": 4}}})
    with pytest.raises(ParamsError, match=r"augment\.supervised\.translate_padding"):
        parse_params({"augment": {"supervised": {"translate_padding": "edge"}}})


def test_stage_is_registered_after_prepare() -> None:
    from refinery import pipeline

    names = [s.name for s in pipeline.STAGES]
    assert names.index("augment") == names.index("prepare") + 1
    assert pipeline.stage_named("augment").params == ("data_seed", "augment")
