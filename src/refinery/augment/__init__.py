"""Batched, per-image-random augmentation on the training device.

Two policies, built from ``params.augment`` by the ``augment`` stage
(:mod:`refinery.stages.augment`) and read back by the training stages with
:func:`refinery.formats.policies.load_policies`:

* :class:`SupervisedPolicy`: crop/translate, flip, RandAugment or
  TrivialAugmentWide, random erasing, then MixUp/CutMix on the batch;
* :class:`SslPolicy`: SimCLR's two views (resized crop, flip, colour jitter,
  grayscale, blur).

Both take uint8 or float ``(N, C, H, W)`` batches already on the device and
return float32 in ``[0, 1]`` (the models normalize themselves). Randomness is
per image and comes only from the generator you pass::

    params = policy.sample(n, generator, device)   # every random number, sliceable
    views = policy.apply(images, params)           # deterministic given params
    local = policy.apply(my_images, params[rank_slice])  # DDP: same as a single process

The ops follow torchvision v2's definitions (``tests/test_augment.py`` checks
each against ``torchvision.transforms.v2.functional`` image by image). ``apply``
runs in float32 even inside the training step's autocast, has no host sync on
a GPU (so ``torch.compile(policy.apply, fullgraph=True)`` works) and touches
the generator only in ``sample``; for no host -> device copies at all, pass a
generator on the training device.
"""

from refinery.augment.batch import ParamBatch
from refinery.augment.selfsup import SslPolicy, TwoViewParams, ViewParams
from refinery.augment.supervised import SupervisedParams, SupervisedPolicy

__all__ = [
    "ParamBatch",
    "SslPolicy",
    "SupervisedParams",
    "SupervisedPolicy",
    "TwoViewParams",
    "ViewParams",
]
