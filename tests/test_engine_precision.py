"""The engine's bf16 path: when ``engine.amp: auto`` takes it, and the SSL kNN monitor
under it (what runs at the end of every pretraining epoch on CUDA and bf16 CPUs)."""

from __future__ import annotations

import torch

from refinery.engine.runtime import native_bf16_cpu
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


def test_auto_amp_takes_bf16_only_on_cpus_with_bf16_instructions(tmp_path) -> None:
    avx512_bf16 = tmp_path / "sapphire"
    avx512_bf16.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_tile\n")
    amx = tmp_path / "amx"
    amx.write_text("flags\t\t: fpu avx2 amx_bf16 amx_tile\n")
    plain = tmp_path / "skylake"
    plain.write_text("flags\t\t: fpu avx2 avx512f avx512bw avx512_vnni\nbugs\t\t: avx512_bf16\n")
    assert native_bf16_cpu(avx512_bf16) and native_bf16_cpu(amx)
    assert not native_bf16_cpu(plain)  # only the flags line counts
    assert not native_bf16_cpu(tmp_path / "no-cpuinfo")
