"""The knowledge-distillation loss, checked against a value computed by hand."""

from __future__ import annotations

import math

import torch

from refinery.stages.distill import UNLABELED, kd_loss


def _softmax(values: list[float], t: float) -> list[float]:
    exps = [math.exp(v / t) for v in values]
    return [e / sum(exps) for e in exps]


def test_kd_loss_matches_hand_computation() -> None:
    student = [[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]]
    teacher = [[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]]
    labels = [0, UNLABELED]
    t, alpha = 2.0, 0.7
    expected = []
    for s, te, y in zip(student, teacher, labels, strict=True):
        p_t, p_s = _softmax(te, t), _softmax(s, t)
        kd = t * t * sum(a * math.log(a / b) for a, b in zip(p_t, p_s, strict=True))
        term = alpha * kd
        if y != UNLABELED:
            term += (1 - alpha) * -math.log(_softmax(s, 1.0)[y])
        expected.append(term)
    loss, metrics = kd_loss(torch.tensor(student), torch.tensor(teacher), torch.tensor(labels),
                            t, alpha)
    assert math.isclose(float(loss), sum(expected) / 2, rel_tol=1e-6)
    assert math.isclose(float(metrics["labeled_share"]), 0.5)


def test_unlabeled_images_contribute_only_the_kd_term() -> None:
    """The batch loss is the mean of per-image terms: alpha * KD for an unlabeled image,
    alpha * KD + (1 - alpha) * CE for a labeled one. Split the batch and rebuild it."""
    torch.manual_seed(0)
    student = torch.randn(6, 10)
    teacher = torch.randn(6, 10)
    labels = torch.tensor([3, 1, UNLABELED, UNLABELED, 7, UNLABELED])
    unlabeled = labels == UNLABELED
    alpha, t = 0.5, 4.0
    loss, _ = kd_loss(student, teacher, labels, t, alpha)
    # the unlabeled rows alone: exactly alpha times their KD term (computed with alpha = 1)
    kd_unlabeled, _ = kd_loss(student[unlabeled], teacher[unlabeled], labels[unlabeled], t, 1.0)
    alone, _ = kd_loss(student[unlabeled], teacher[unlabeled], labels[unlabeled], t, alpha)
    assert torch.isclose(alone, alpha * kd_unlabeled)
    # ... and whatever class an unlabeled image "would" have, no CE reaches the loss: as
    # labeled images of any class they would add (1 - alpha) * CE > 0
    for cls in range(10):
        as_labeled, _ = kd_loss(student[unlabeled], teacher[unlabeled],
                                torch.full((int(unlabeled.sum()),), cls), t, alpha)
        assert as_labeled > alone
    labeled_part, _ = kd_loss(student[~unlabeled], teacher[~unlabeled], labels[~unlabeled], t,
                              alpha)
    rebuilt = (alone * unlabeled.sum() + labeled_part * (~unlabeled).sum()) / len(labels)
    assert torch.isclose(loss, rebuilt)


def test_identical_logits_have_zero_kd() -> None:
    logits = torch.randn(4, 5)
    loss, metrics = kd_loss(logits, logits, torch.full((4,), UNLABELED), 3.0, 0.9)
    assert float(loss) < 1e-6 and float(metrics["kd"]) < 1e-6
