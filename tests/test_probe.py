"""The linear probe (LP-FT's head, evaluate's baseline): its penalty is chosen on val."""

from __future__ import annotations

import pytest
import torch

from refinery.probe import L2_GRID, fit_probe


def _data(n: int, noise_dims: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Three classes apart in two feature dimensions, plus many dimensions of noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 3
    centres = torch.tensor([[2.0, 0.0], [-1.0, 1.7], [-1.0, -1.7]])
    signal = centres[labels] + torch.randn(n, 2, generator=g)
    return torch.cat([signal, 3 * torch.randn(n, noise_dims, generator=g) + 5], 1), labels


def test_few_labels_and_many_noisy_features_get_a_strong_penalty() -> None:
    train, train_y = _data(60, 200, seed=0)  # 60 images, 202 features: separable by noise
    val, val_y = _data(300, 200, seed=1)
    test, test_y = _data(600, 200, seed=2)
    probe = fit_probe(train, train_y, val, val_y, classes=3)
    weakest = fit_probe(train, train_y, val, val_y, classes=3, grid=(L2_GRID[0],))
    assert weakest.train_acc == 1.0  # the weak penalty memorises the noise...
    assert probe.l2 > L2_GRID[0]  # ...so val picks a stronger one,
    assert probe.val_loss < weakest.val_loss
    # which generalises better: a calibrated head (what fine-tuning starts from)
    test_loss = {p.l2: float(torch.nn.functional.cross_entropy(p.logits(test), test_y))
                 for p in (probe, weakest)}
    assert test_loss[probe.l2] < test_loss[weakest.l2] - 0.1, test_loss
    assert probe.logits(test).abs().max() < weakest.logits(test).abs().max() / 2


def test_the_probe_applies_to_raw_features() -> None:
    """Standardisation is folded into the weights: logits on raw features reproduce the
    val accuracy the choice was made on, at any feature offset and scale."""
    train, train_y = _data(300, 5, seed=3)
    val, val_y = _data(200, 5, seed=4)
    probe = fit_probe(100 * train - 7, train_y, 100 * val - 7, val_y, classes=3)
    accuracy = float((probe.logits(100 * val - 7).argmax(1) == val_y).float().mean())
    assert accuracy == pytest.approx(probe.val_acc)
    assert probe.val_acc > 0.8


def test_an_empty_val_split_is_refused() -> None:
    train, train_y = _data(30, 2, seed=5)
    with pytest.raises(ValueError, match="non-empty val"):
        fit_probe(train, train_y, train[:0], train_y[:0], classes=3)
