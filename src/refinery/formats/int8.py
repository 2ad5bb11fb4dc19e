"""``models/student-int8/model.pt2``: the int8 program ``quantize`` writes and others run.

A ``torch.export`` program with a dynamic batch (see :mod:`refinery.stages.quantize`
for how it is made). It loads in a process that imports nothing from this
project: ``torch`` plus ``torch.ao.quantization.fx._decomposed`` (registers the
``quantized_decomposed`` q/dq ops the graph uses; without it ``torch.export.load``
fails with "We failed to resolve torch.ops.quantized_decomposed...")::

    import torch
    import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers the q/dq ops)
    module = torch.export.load("model.pt2").module()
    logits = module(images)  # float [0, 1] NCHW, any batch size; fp32 math on int8 weights

:func:`compile_for_cpu` turns it into real oneDNN int8 kernels (torchao needed).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from refinery import fsutil

#: File name of the int8 program inside the stage's output folder.
ARTIFACT_NAME = "model.pt2"

#: The registration import a fresh process needs before ``torch.export.load``.
OPS_MODULE = "torch.ao.quantization.fx._decomposed"


def register_quantized_ops() -> None:
    """Register ``torch.ops.quantized_decomposed.*`` (needed before loading a ``.pt2``)."""
    import importlib

    importlib.import_module(OPS_MODULE)


def save_quantized(program: torch.export.ExportedProgram, path: str | Path) -> Path:
    """Write ``program`` to ``path`` (``.pt2``) atomically."""
    path = Path(path)
    # A file object: torch.export.save warns about a path not ending in .pt2 (the temp name).
    with fsutil.atomic_path(path) as tmp, tmp.open("wb") as stream:
        torch.export.save(program, stream)
    return path


def load_quantized(path: str | Path) -> nn.Module:
    """Load a ``.pt2`` as a callable module (eager q/dq graph; fp32 math on int8 weights).

    Use :func:`compile_for_cpu` on the result for real int8 kernels.
    """
    register_quantized_ops()
    module = torch.export.load(Path(path)).module()
    for tensor in [*module.parameters(), *module.buffers()]:
        tensor.requires_grad_(False)
    return module


def compile_for_cpu(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """``torch.compile`` a quantized module so Inductor runs oneDNN int8 kernels.

    Needs Inductor's *freezing* (weights become constants, so the int8 weight
    prepack and conv+add+ReLU fusions can run) and torchao's x86 lowering
    passes, which register when the quantizer module is imported: torch 2.14's
    Inductor no longer carries them, and without them the compiled graph does
    fp32 math on dequantized weights.
    Shapes are static (``dynamic=False``): each new batch size compiles once
    on its first call (seconds; keep evaluation batches a fixed size). A
    dynamic-batch compile is not an option in torch 2.14 / torchao 0.18: the
    int8 conv's fake kernel reports an NCHW output where oneDNN returns
    channels-last, and the compiled code fails its stride check for some
    shapes. The returned function runs under ``no_grad``, which freezing needs.
    """
    import torch._inductor.config as inductor_config
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer  # noqa: F401

    compiled = torch.compile(
        module,
        dynamic=False,
        # No guards on module attributes: with freezing the weights are baked into
        # the compiled code anyway, and the guards cost ~0.1 ms of a ~2 ms batch-1 call.
        options={"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe},
    )

    def run(images: torch.Tensor) -> torch.Tensor:
        # Freezing must be the *global* setting while Dynamo traces (a recompile can
        # happen on any call): passing it in torch.compile's options or wrapping the
        # backend leaves the int8 weight prepack unfolded and compilation fails.
        # Set and restored per call (~13 us; config.patch() costs ~50 us), so it
        # never leaks to other compiled models, whose weights it would freeze.
        # The C++ wrapper takes the Python glue out of the calls between kernels:
        # 15-20% off batch-1 latency here.
        previous = inductor_config.freezing, inductor_config.cpp_wrapper
        inductor_config.freezing, inductor_config.cpp_wrapper = True, True
        try:
            with torch.no_grad(), warnings.catch_warnings():
                # torchao's lowering copies a tensor with torch.tensor(); harmless.
                warnings.filterwarnings("ignore", message="To copy construct from a tensor")
                return compiled(images)
        finally:
            inductor_config.freezing, inductor_config.cpp_wrapper = previous

    return run


def file_size_ratio(fp32_file: str | Path, int8_file: str | Path) -> float:
    """How many times smaller the int8 artifact is than the fp32 state dict."""
    return Path(fp32_file).stat().st_size / Path(int8_file).stat().st_size
