"""Static int8 quantization of a trained model (PT2E, torchao) and its artifact.

Path (torch 2.14 + torchao 0.18; ``torch.ao.quantization`` is deprecated):

1. ``torch.export.export(..., strict=True)`` with a dynamic batch dimension.
   *Strict* export on purpose: the default non-strict export labels both calls
   of a reused ``nn.ReLU`` (our ``BasicBlock`` and torchvision's ResNet call
   ``self.relu`` twice) with the same module, so ``X86InductorQuantizer`` sees
   one ReLU "partition" with two outputs and fails with *"Input partition has
   more than one output node"*. Strict export gives every call its own source.
2. ``prepare_pt2e`` (PTQ: histogram observers on activations, per-channel
   min/max on weights) or ``prepare_qat_pt2e`` (fake-quant training), then
   calibration or training, then ``convert_pt2e`` (q/dq graph, int8 weights).
3. Re-export of the converted graph so the artifact is an ``ExportedProgram``
   with a dynamic batch, after dropping what would bloat it: the fp32 weights
   that ``convert_pt2e`` leaves attached but unused, per-node debug metadata
   (stack traces, provenance) and the example input. What remains of a
   0.3M-parameter student: int8 weights 72%, graph JSON 20%, fp32 scales,
   biases and int64 zero points 3%.

The saved ``.pt2`` loads in a process that imports nothing from this project.
It needs ``torch`` plus ``torch.ao.quantization.fx._decomposed`` (part of
torch, not deprecated API: it only registers the ``quantized_decomposed`` q/dq
operators the graph uses; without it ``torch.export.load`` fails with "We
failed to resolve torch.ops.quantized_decomposed..."). torchao is not needed
to load or run it eagerly, only to *compile* it to int8 kernels::

    import torch
    import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers the q/dq ops)
    module = torch.export.load("student-int8.pt2").module()
    logits = module(images)  # float [0, 1] NCHW, any batch size; fp32 math on int8 weights
    # int8 kernels: import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer,
    # then torch.compile with torch._inductor.config.freezing = True, under no_grad
    # (what compile_for_cpu does).
"""

from __future__ import annotations

import argparse
import copy
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from refinery import fsutil, paths, scoring, stage
from refinery.formats.int8 import (
    ARTIFACT_NAME,
    OPS_MODULE,
    compile_for_cpu,
    file_size_ratio,
    load_quantized,
    register_quantized_ops,
    save_quantized,
)
from refinery.params import Params, QuantizeParams
from refinery.pipeline import int8_row, model_row, stage_named

__all__ = [
    "ARTIFACT_NAME",
    "compile_for_cpu",
    "file_size_ratio",
    "load_quantized",
    "quantize",
    "quantize_ptq",
    "quantize_qat",
    "register_quantized_ops",
    "save_quantized",
]


#: Node metadata that only serves debugging; kept out of the saved artifact.
_DEBUG_META = ("stack_trace", "from_node", "source_fn_stack", "torch_fn", "nn_module_stack")


def _quantizer(*, is_qat: bool, reduce_range: bool):  # -> X86InductorQuantizer
    # Importing this module also registers torchao's int8 fusion passes with Inductor.
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer,
        get_default_x86_inductor_quantization_config,
    )

    config = get_default_x86_inductor_quantization_config(
        is_qat=is_qat, is_dynamic=False, reduce_range=reduce_range
    )
    return X86InductorQuantizer().set_global(config)


def _as_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 0..255 or float 0..1 -> float 0..1 (callers may pass either)."""
    images = images.cpu()  # x86 int8 quantization is CPU work
    return images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()


def _batches(images: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    for start in range(0, images.shape[0], batch_size):
        yield _as_float(images[start : start + batch_size])


def _example(images: torch.Tensor) -> tuple[torch.Tensor]:
    """Two images: batch size 1 would be specialized by export and break the dynamic dim."""
    first = _as_float(images[:1])
    return (first.expand(2, *first.shape[1:]).contiguous(),)


def _dynamic_batch() -> tuple[dict[int, torch.export.Dim]]:
    return ({0: torch.export.Dim("batch", min=1)},)


def _export(module: nn.Module, example: tuple[torch.Tensor]) -> torch.export.ExportedProgram:
    return torch.export.export(module, example, dynamic_shapes=_dynamic_batch(), strict=True)


def _drop_unused_tensors(graph_module: torch.fx.GraphModule) -> None:
    """Delete parameters and buffers the graph never reads.

    ``convert_pt2e`` folds each weight into an int8 constant but leaves the
    original fp32 parameter on the module; re-exporting would save it too,
    making the "int8" file larger than the fp32 state dict.
    """
    used = {node.target for node in graph_module.graph.nodes if node.op == "get_attr"}
    named = [*graph_module.named_parameters(), *graph_module.named_buffers()]
    for name, _ in named:
        if name not in used:
            owner, _, attr = name.rpartition(".")
            delattr(graph_module.get_submodule(owner), attr)


def _finalize(
    converted: torch.fx.GraphModule, images: torch.Tensor
) -> torch.export.ExportedProgram:
    """Re-export the converted graph as a lean, dynamic-batch ``ExportedProgram``."""
    _drop_unused_tensors(converted)
    example = _example(images)
    program = _export(converted, example)
    for node in program.graph.nodes:
        for key in _DEBUG_META:
            node.meta.pop(key, None)
    program.example_inputs = None  # the graph's signature already states the input shape
    return program


def _float_copy(model: nn.Module) -> nn.Module:
    """A CPU fp32 copy, so quantizing never touches the caller's model."""
    from refinery.models import unwrap

    return copy.deepcopy(unwrap(model)).float().cpu()


def quantize_ptq(
    model: nn.Module,
    calibration: torch.Tensor,
    batch_size: int = 64,
    *,
    reduce_range: bool = False,
) -> torch.export.ExportedProgram:
    """Post-training static int8 quantization, calibrated on ``calibration`` images.

    ``calibration``: NCHW images, float in [0, 1] or uint8. Weights are
    quantized per output channel (int8, symmetric), activations per tensor
    (uint8, affine) with ranges from histogram observers over all batches.
    ``reduce_range`` uses 7-bit activations, which avoids int16 saturation in
    oneDNN's int8 kernels on CPUs without VNNI (see :func:`needs_reduce_range`).
    """
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    if calibration.shape[0] == 0:
        raise ValueError("calibration needs at least one image")
    float_model = _float_copy(model).eval()
    with torch.no_grad():
        graph = _export(float_model, _example(calibration)).module()
        prepared = prepare_pt2e(graph, _quantizer(is_qat=False, reduce_range=reduce_range))
        for batch in _batches(calibration, batch_size):
            prepared(batch)
        converted = convert_pt2e(prepared)
    return _finalize(converted, calibration)


def _disable_observers_at(epoch: int, epochs: int) -> bool:
    """Freeze the learned ranges for the last epoch so the weights adapt to fixed scales."""
    return epochs > 1 and epoch == epochs - 1


def quantize_qat(
    model: nn.Module,
    train_images: torch.Tensor,
    train_labels: torch.Tensor,
    *,
    epochs: int,
    lr: float,
    batch_size: int = 64,
    momentum: float = 0.9,
    seed: int = 0,
    reduce_range: bool = False,
    log: Callable[[int, float], None] | None = None,
) -> torch.export.ExportedProgram:
    """Quantization-aware fine-tuning, then int8 conversion (same artifact as PTQ).

    Fake quantizers on the exported graph learn activation ranges while SGD
    adapts the weights to int8 rounding; observers are frozen for the last
    epoch (when there is more than one). ``log`` receives ``(epoch, mean
    loss)`` after each epoch.

    Batch norm is folded into the convolutions *before* training, with the
    model's running statistics (the "frozen BN" phase of the usual QAT
    recipe). This is a fine-tune of a converged model at a small learning
    rate, where re-estimating BN statistics buys nothing, and it avoids
    torchao's QAT conv+BN folding at convert time, which exports ~100 pattern
    variants and took 20-40 s per model on the 2-core CI machine.
    """
    from torchao.quantization.pt2e import (
        disable_observer,
        move_exported_model_to_eval,
        move_exported_model_to_train,
    )
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_qat_pt2e

    # Private, but the very function prepare_pt2e folds BN with (torchao pinned to 0.18.0).
    from torchao.quantization.pt2e.utils import _fuse_conv_bn_

    count = train_images.shape[0]
    if count == 0 or train_labels.shape[0] != count:
        raise ValueError("QAT needs images and one label per image")
    float_model = _float_copy(model).eval()
    graph = _export(float_model, _example(train_images)).module()
    # Fold batch norm into the convolutions first (as prepare_pt2e does for PTQ).
    _fuse_conv_bn_(graph)
    for parameter in graph.parameters():
        parameter.requires_grad_(True)
    prepared = prepare_qat_pt2e(graph, _quantizer(is_qat=True, reduce_range=reduce_range))
    move_exported_model_to_train(prepared)  # dropout, if a model has any, back to train mode
    optimizer = torch.optim.SGD(prepared.parameters(), lr=lr, momentum=momentum)
    generator = torch.Generator().manual_seed(seed)
    labels = train_labels.long().cpu()
    for epoch in range(epochs):
        if _disable_observers_at(epoch, epochs):
            prepared.apply(disable_observer)
        order = torch.randperm(count, generator=generator)
        total, seen = 0.0, 0
        for start in range(0, count, batch_size):
            index = order[start : start + batch_size]
            loss = nn.functional.cross_entropy(prepared(_as_float(train_images[index])),
                                               labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.detach().item() * index.numel()
            seen += index.numel()
        if not math.isfinite(total):
            raise FloatingPointError(f"QAT loss diverged in epoch {epoch} (lr={lr})")
        if log is not None:
            log(epoch, total / max(seen, 1))
    move_exported_model_to_eval(prepared)
    with torch.no_grad():
        converted = convert_pt2e(prepared)
    return _finalize(converted, train_images)


def accuracy_drop_points(fp32_accuracy: float, int8_accuracy: float) -> float:
    """Accuracy lost by quantization in percentage points (accuracies given as 0..1)."""
    return 100.0 * (fp32_accuracy - int8_accuracy)


def needs_qat(fp32_accuracy: float, int8_accuracy: float, qat_if_drop_above: float) -> bool:
    """Whether PTQ lost more than ``qat_if_drop_above`` points (``quantize.qat_if_drop_above``)."""
    return accuracy_drop_points(fp32_accuracy, int8_accuracy) > qat_if_drop_above


def needs_reduce_range() -> bool:
    """True on x86 CPUs without VNNI, where oneDNN's u8*s8 products can saturate int16."""
    return not torch.cpu._is_vnni_supported()


# --------------------------------------------------------------------- artifact


# ------------------------------------------------------------------------ stage


@dataclass
class QuantizeResult:
    fp32_val_accuracy: float
    int8_val_accuracy: float
    ptq_val_accuracy: float
    qat_used: bool
    fp32_bytes: int
    int8_bytes: int
    calibration_images: int
    seconds: float

    def metrics(self) -> dict[str, float]:
        return {
            "fp32_val_acc": self.fp32_val_accuracy,
            "int8_val_acc": self.int8_val_accuracy,
            "ptq_val_acc": self.ptq_val_accuracy,
            "accuracy_drop_points": accuracy_drop_points(self.fp32_val_accuracy,
                                                         self.int8_val_accuracy),
            "qat_used": float(self.qat_used),
            "fp32_bytes": float(self.fp32_bytes),
            "int8_bytes": float(self.int8_bytes),
            "size_reduction": self.fp32_bytes / max(self.int8_bytes, 1),
            "calibration_images": float(self.calibration_images),
            "seconds": self.seconds,
        }


def _accuracy(predict: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor,
              labels: torch.Tensor, batch_size: int = 256) -> float:
    return scoring.accuracy(scoring.predict_logits(predict, images.cpu(), batch_size), labels)


def quantize(p: QuantizeParams, *, seed: int, prepared_dir: Path, student_dir: Path,
             out_dir: Path) -> QuantizeResult:
    """The ``quantize`` stage: PTQ of the distilled student, QAT when PTQ loses too much.

    Accuracy is measured on the validation split with the eager q/dq graph
    (the same int8 rounding the compiled kernels apply); the test split is
    left to ``evaluate``.
    """
    import time

    from refinery import models
    from refinery.formats.prepared import load_prepared

    started = time.perf_counter()
    data = load_prepared(prepared_dir, splits=("train", "val"))
    student = models.load_model(student_dir).eval()
    generator = torch.Generator().manual_seed(seed)
    count = min(p.calibration_images, len(data.train))
    calibration = data.train.images[torch.randperm(len(data.train), generator=generator)[:count]]
    program = quantize_ptq(student, calibration, p.calibration_batch, reduce_range=p.reduce_range)
    fp32_acc = _accuracy(student, data.val.images, data.val.labels)
    ptq_acc = _accuracy(program.module(), data.val.images, data.val.labels)
    int8_acc, qat = ptq_acc, needs_qat(fp32_acc, ptq_acc, p.qat_if_drop_above)
    if qat:
        labeled = data.labeled
        program = quantize_qat(student, data.train.images[labeled], data.train.labels[labeled],
                               epochs=p.qat_epochs, lr=p.qat_lr, batch_size=p.qat_batch_size,
                               seed=seed, reduce_range=p.reduce_range)
        int8_acc = _accuracy(program.module(), data.val.images, data.val.labels)
    out_dir = Path(out_dir)
    with fsutil.atomic_dir(out_dir) as tmp:
        save_quantized(program, tmp / ARTIFACT_NAME)
        config = models.load_config(student_dir)
        fsutil.write_json(tmp / "meta.json", {
            "input": {"shape": ["batch", config.in_channels, config.image_size,
                                config.image_size], "dtype": "float32", "range": [0.0, 1.0]},
            "classes": list(config.classes),
            "load": f"import torch, {OPS_MODULE}; "
                    f"torch.export.load('{ARTIFACT_NAME}').module()(images)",
            "quantization": "PT2E static int8 (torchao X86InductorQuantizer)"
                            + (", quantization-aware fine-tuned" if qat else ""),
            "student_config": config.to_json(),
        })
    return QuantizeResult(
        fp32_val_accuracy=fp32_acc, int8_val_accuracy=int8_acc, ptq_val_accuracy=ptq_acc,
        qat_used=qat, fp32_bytes=(Path(student_dir) / "model.pt").stat().st_size,
        int8_bytes=(out_dir / ARTIFACT_NAME).stat().st_size, calibration_images=count,
        seconds=time.perf_counter() - started)


def main(params: Params, args: argparse.Namespace) -> None:
    """The adapter (:mod:`refinery.stage`): ``python -m refinery quantize``."""
    declared = stage_named("quantize")
    target = int8_row()
    with stage.tracked(declared, params) as run:
        result = quantize(params.quantize, seed=params.seed, prepared_dir=paths.PREPARED,
                          student_dir=model_row(target.source or "").path,
                          out_dir=target.path)
        stage.finish(declared, run, result.metrics(), artifacts=[target.path / "meta.json"])
