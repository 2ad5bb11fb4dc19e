"""A linear probe on frozen features: logistic regression whose L2 penalty is chosen on val.

Two places fit one: LP-FT's first step (:func:`refinery.stages.finetune.fit_head`)
and the linear-probe baseline of ``evaluate``. Both need the same thing, a
head that generalises from a few hundred labeled images, and a fixed penalty
cannot give it at every data size. Measured on the CIFAR-10 subset (450
labels, 256 features, ``benchmarks/cifar_subset.py``): a fixed 1e-3 fits the
labeled images perfectly, scores 0.368 on val and leaves logits up to 16, an
overconfident head whose gradients then scrambled the backbone in
fine-tuning (val 0.334 after LP-FT, below the head alone); the penalty chosen
on val (3e-2) scores 0.426 with logits up to 6. On the digits default the
choice is a weak penalty, as before.

The features are standardised (so one grid fits any feature scale) and the
standardisation is folded back into the weights: the probe applies to raw
features. L-BFGS on the full batch: deterministic, a fraction of a second for
a few thousand images.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

#: Candidate penalties (on the mean cross-entropy, standardised features), weakest first.
L2_GRID = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)


@dataclass(frozen=True)
class Probe:
    weight: torch.Tensor  # (classes, features), on raw features
    bias: torch.Tensor  # (classes,)
    l2: float  # the chosen penalty
    train_acc: float
    val_acc: float
    val_loss: float

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return features.float() @ self.weight.T + self.bias


def _fit(features: torch.Tensor, targets: torch.Tensor, classes: int, l2: float,
         start: tuple[torch.Tensor, torch.Tensor] | None, iterations: int
         ) -> tuple[torch.Tensor, torch.Tensor]:
    weight = (start[0].clone() if start else torch.zeros(classes, features.shape[1])
              ).requires_grad_(True)
    bias = (start[1].clone() if start else torch.zeros(classes)).requires_grad_(True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=iterations,
                                  line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(features @ weight.T + bias, targets) + l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return weight.detach(), bias.detach()


def fit_probe(train: torch.Tensor, train_labels: torch.Tensor, val: torch.Tensor,
              val_labels: torch.Tensor, classes: int, grid: tuple[float, ...] = L2_GRID,
              iterations: int = 200) -> Probe:
    """The probe of the penalty in ``grid`` with the lowest val cross-entropy (log-loss
    rather than accuracy: smoother on a small val split, and it rewards a calibrated
    head, which is what fine-tuning starts from)."""
    if not grid or not len(val):
        raise ValueError("fit_probe needs at least one L2 penalty and a non-empty val split")
    train, val = train.float().cpu(), val.float().cpu()
    train_labels, val_labels = train_labels.long().cpu(), val_labels.long().cpu()
    mean, std = train.mean(0), train.std(0).clamp_min(1e-6)
    x_train, x_val = (train - mean) / std, (val - mean) / std
    best: Probe | None = None
    start = None
    for l2 in sorted(grid, reverse=True):  # strongest first: each fit warm-starts the next
        start = _fit(x_train, train_labels, classes, l2, start, iterations)
        weight, bias = start
        val_logits = x_val @ weight.T + bias
        val_loss = float(F.cross_entropy(val_logits, val_labels))
        if best is None or val_loss < best.val_loss:
            raw_weight = weight / std  # w . (f - mean) / std + b == (w / std) . f + b'
            best = Probe(raw_weight, bias - raw_weight @ mean, l2,
                         float(((x_train @ weight.T + bias).argmax(1) == train_labels)
                               .float().mean()),
                         float((val_logits.argmax(1) == val_labels).float().mean()), val_loss)
    assert best is not None
    return best
