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
    torch.manual_seed(0)
    student = torch.randn(6, 10, requires_grad=True)
    teacher = torch.randn(6, 10)
    labels = torch.tensor([3, 1, UNLABELED, UNLABELED, 7, UNLABELED])
    loss, _ = kd_loss(student, teacher, labels, 4.0, 0.5)
    loss.backward()
    grad = student.grad.clone()
    # with alpha = 1 there is no CE term at all: unlabeled rows' gradients must not change
    student.grad = None
    kd_only, _ = kd_loss(student, teacher, labels, 4.0, 1.0)
    kd_only.backward()
    unlabeled = labels == UNLABELED
    assert torch.allclose(grad[unlabeled], 0.5 * student.grad[unlabeled], atol=1e-7)
    # and no label value can leak into an unlabeled row: the loss ignores it
    other = labels.clone()
    other[unlabeled] = UNLABELED
    again, _ = kd_loss(student.detach(), teacher, other, 4.0, 0.5)
    assert torch.isclose(again, loss.detach())


def test_identical_logits_have_zero_kd() -> None:
    logits = torch.randn(4, 5)
    loss, metrics = kd_loss(logits, logits, torch.full((4,), UNLABELED), 3.0, 0.9)
    assert float(loss) < 1e-6 and float(metrics["kd"]) < 1e-6
