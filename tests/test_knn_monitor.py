"""The SSL kNN monitor under autocast: what the engine's bf16 path (CUDA's default,
``engine.amp: bf16`` on a CPU) runs at the end of every pretraining epoch."""

from __future__ import annotations

import torch

from refinery.training import knn_accuracy


def _clusters(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    centres = torch.randn(4, 16, generator=torch.Generator().manual_seed(0)) * 3
    labels = torch.arange(n) % 4
    noise = torch.randn(n, 16, generator=torch.Generator().manual_seed(seed))
    return centres[labels] + noise, labels


def test_knn_accuracy_is_float32_under_bf16_autocast() -> None:
    bank, bank_labels = _clusters(200, 0)
    query, query_labels = _clusters(100, 1)
    plain = knn_accuracy(bank, bank_labels, query, query_labels, num_classes=4, k=10)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # crashed here: bf16 votes vs fp32 tally
        under = knn_accuracy(bank, bank_labels, query, query_labels, num_classes=4, k=10)
        from_bf16 = knn_accuracy(bank.bfloat16(), bank_labels, query.bfloat16(), query_labels,
                                 num_classes=4, k=10)
    assert plain > 0.9  # separable clusters: the monitor sees them
    assert under == plain
    assert abs(from_bf16 - plain) <= 0.02
