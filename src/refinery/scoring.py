"""Scoring a model, once for every stage: top-1 accuracy, and logits over uint8 images.

The training monitors, ``quantize`` (validation accuracy of the int8 program)
and ``evaluate`` (the test set) all score with these, so an accuracy means the
same thing wherever it is reported.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

Predict = Callable[[torch.Tensor], torch.Tensor]
Transform = Callable[[torch.Tensor, int], torch.Tensor]  # (float batch, batch index) -> batch


def accuracy(scores: Any, labels: Any) -> float:
    """Top-1 accuracy (0..1) of logits or probabilities ``(N, K)`` against labels ``(N,)``.

    Tensors stay on their device (one number crosses to the host); arrays and
    lists are counted with NumPy. Exact: the count of hits over ``N``.
    """
    if isinstance(scores, torch.Tensor):
        labels = torch.as_tensor(labels, device=scores.device)
        count = int(labels.shape[0])
        hits = int((scores.argmax(dim=1) == labels).sum()) if count else 0
    else:
        y = np.asarray(labels)
        count = int(y.shape[0])
        hits = int((np.asarray(scores).argmax(axis=1) == y).sum()) if count else 0
    if count == 0:
        raise ValueError("accuracy of an empty set is undefined")
    return hits / count


def _batches(images: torch.Tensor, batch_size: int) -> Iterator[tuple[int, torch.Tensor]]:
    for index, start in enumerate(range(0, images.shape[0], batch_size)):
        yield index, images[start : start + batch_size].float().div_(255.0)


def predict_logits(predict: Predict, images_uint8: torch.Tensor, batch_size: int,
                   transform: Transform | None = None) -> torch.Tensor:
    """Logits ``(N, K)`` (float, CPU) over uint8 images, in fixed-size batches."""
    outputs = []
    with torch.no_grad():
        for index, batch in _batches(images_uint8, batch_size):
            if transform is not None:
                batch = transform(batch, index)
            outputs.append(predict(batch).detach().float().cpu())
    return torch.cat(outputs)
