"""The pipeline: the one ordered list of stage declarations, and ``dvc.yaml`` made from it.

Each :class:`~refinery.stage.Stage` says once what the stage reads (params keys,
other stages' outputs) and writes; its code is ``refinery.stages.<module>``
(``main`` runs it). ``dvc.yaml`` is generated from this list by
:func:`dvc_yaml` (``refinery dvc-yaml``) and checked in, so a reviewer sees
every change to what DVC tracks; ``tests/test_stage_list.py`` fails when the
file is not current. The code dependencies in it are not typed by anyone:
they are every module the stage's module imports inside ``refinery``
(:mod:`refinery.codedeps`). The Prefect flow reads ``dvc.yaml``'s stages,
the CLI this list.

This module imports no stage code (the CLI's ``--help`` stays instant).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from refinery import codedeps, paths
from refinery.stage import PlotFile, Stage

P = paths


@dataclass(frozen=True)
class ModelRow:
    """A model the pipeline makes, as the evaluation compares it (one row each, in order)."""

    name: str
    path: Path  # its folder: model.pt + config.json, or model.pt2 for an int8 program
    about: str
    source: str | None = None  # the row this model is made from (quantize reads it)
    compared_to: str | None = None  # the row whose accuracy ``step`` is measured against
    step: str = ""  # what ``name`` minus ``compared_to`` measures
    int8: bool = False  # a torch.export int8 program (run compiled), not an fp32 state dict

    @property
    def file(self) -> Path:
        return self.path / ("model.pt2" if self.int8 else "model.pt")

    @property
    def source_path(self) -> Path:
        """The folder of the model this one is made from."""
        if self.source is None:
            raise ValueError(f"model {self.name} is not made from another")
        return model_row(self.source).path


MODELS: tuple[ModelRow, ...] = (
    ModelRow("scratch", P.SCRATCH,
             "the teacher's network trained from scratch on the labeled subset"),
    ModelRow("teacher", P.TEACHER, "SimCLR-pretrained backbone fine-tuned on the labeled subset",
             compared_to="scratch", step="Pretraining"),
    ModelRow("student", P.STUDENT, "small student distilled from the teacher (fp32)",
             source="teacher", compared_to="teacher", step="Distillation"),
    ModelRow("student_pruned", P.MODELS / "student-pruned",
             "the student with prune.ratio of its channels removed, recovered by distillation",
             source="student", compared_to="student", step="Pruning"),
    ModelRow("student_int8", P.STUDENT_INT8,
             "the pruned student, int8 static quantization (compiled oneDNN kernels)",
             source="student_pruned", compared_to="student_pruned", step="Quantization",
             int8=True),
)


def model_row(name: str) -> ModelRow:
    for row in MODELS:
        if row.name == name:
            return row
    raise KeyError(name)


def int8_row() -> ModelRow:
    """The deployable model: the int8 row (what the registry gate judges)."""
    return next(row for row in MODELS if row.int8)


_TRAIN_KEYS = ("seed", "model.teacher", "engine")
#: the data sets prepare describes in meta.json (formats.prepared.describe): the three
#: splits and the labeled rows of train; a stage's run names those it reads
DATASET_SPLITS = ("train", "val", "labeled", "test")
_TRAIN_VAL = (("train", "training"), ("val", "validation"))
_LABELED_VAL = (("labeled", "training"), ("val", "validation"))
_PREPARED = (P.PREPARED / "meta.json", P.PREPARED / "train.pt", P.PREPARED / "val.pt",
             P.PREPARED / "labeled.pt")
_POLICIES = P.AUGMENT / "policies.json"
_INIT = (("--init", {"choices": ["pretrained", "scratch"], "default": "pretrained",
                     "help": "start from the pretrained backbone or from scratch"}),)


def _curve(stage: str) -> PlotFile:
    return PlotFile(P.PLOTS / f"{stage}.csv")


def _train_images(params: Any, meta: Mapping[str, Any]) -> int:
    return int(meta["counts"]["train"])


def _labeled_images(params: Any, meta: Mapping[str, Any]) -> int:
    return int(meta["labeled"])


def _distilled_images(params: Any, meta: Mapping[str, Any]) -> int:
    """Distillation adds the unlabeled pool (KD term only) unless told not to."""
    return (_train_images if params.distill.use_unlabeled else _labeled_images)(params, meta)


STAGES: tuple[Stage, ...] = (
    Stage("download", "fetch the source (builtin, CIFAR-10 binary, image-folder archive) "
          "into data/raw", params=("data_seed", "download"), deps=(), outs=(P.RAW,),
          headline=("train_records", "test_records", "classes")),
    Stage("validate", "build the image manifest and check it with Great Expectations",
          params=("images", "validate"), deps=(P.RAW,), outs=(P.MANIFEST, P.PIXELS),
          headline=("rows", "failed_expectations")),
    Stage("prepare", "split train/val, pick the labeled subset, pack uint8 tensors; check the "
          "training plan", params=("data_seed", "images", "prepare"),
          deps=(P.RAW, P.MANIFEST, P.PIXELS), outs=(P.PREPARED,),
          headline=("train_images", "labeled_images"),
          datasets=tuple((split, "prepared") for split in DATASET_SPLITS)),
    Stage("augment", "resolve the augmentation policies against the prepared images; preview "
          "grid", params=("data_seed", "augment"), deps=(P.PREPARED / "meta.json",
                                                      P.PREPARED / "train.pt"),
          outs=(P.AUGMENT,), headline=("ssl_view_gap", "supervised_change")),
    Stage("pretrain", "self-supervised SimCLR pretraining of the teacher backbone (GPU when "
          "present)", params=(*_TRAIN_KEYS, "pretrain"), deps=(*_PREPARED, _POLICIES),
          outs=(P.PRETRAINED,), headline=("knn_acc", "steps"), plots=(_curve("pretrain"),),
          schedule="pretrain", epoch_of=_train_images, datasets=_TRAIN_VAL),
    Stage("finetune", "fine-tune the pretrained backbone on the labeled subset (the teacher)",
          params=(*_TRAIN_KEYS, "finetune"), deps=(*_PREPARED, _POLICIES, P.PRETRAINED),
          outs=(P.TEACHER,), headline=("val_acc", "steps"), plots=(_curve("finetune"),),
          cli_args=("--init", "pretrained"), arguments=_INIT, schedule="finetune",
          epoch_of=_labeled_images, datasets=_LABELED_VAL),
    Stage("finetune_scratch", "the same training from random weights: the baseline "
          "pretraining must beat", module="finetune", params=(*_TRAIN_KEYS, "finetune"),
          deps=(*_PREPARED, _POLICIES), outs=(P.SCRATCH,), headline=("val_acc", "steps"),
          plots=(_curve("finetune_scratch"),), cli_args=("--init", "scratch"),
          arguments=_INIT, schedule="finetune", epoch_of=_labeled_images,
          datasets=_LABELED_VAL),
    Stage("distill", "distill the teacher into the small student (labeled + unlabeled "
          "images)", params=("seed", "model.student", "engine", "distill"),
          deps=(*_PREPARED, _POLICIES, P.TEACHER), outs=(P.STUDENT,),
          headline=("val_acc", "teacher_val_acc"), plots=(_curve("distill"),),
          schedule="distill", epoch_of=_distilled_images, datasets=_TRAIN_VAL),
    Stage("prune", "structured channel pruning of the student, then a recovery distillation",
          params=("seed", "engine", "prune"),
          deps=(*_PREPARED, _POLICIES, model_row("student_pruned").source_path, P.TEACHER),
          outs=(model_row("student_pruned").path,), headline=("val_acc", "parameters"),
          plots=(_curve("prune"),), schedule="prune", epoch_of=_train_images,
          datasets=_TRAIN_VAL),
    Stage("quantize", "int8 static quantization of the student (PT2E, x86), QAT if PTQ loses "
          "too much", params=("seed", "quantize"),
          deps=(*_PREPARED, int8_row().source_path),
          outs=(int8_row().path,), headline=("int8_val_acc", "size_reduction"),
          datasets=(("train", "calibration"), ("val", "validation"))),
    Stage("evaluate", "score every model and the baselines (chance, majority, linear probe on "
          "the pretrained features) on test, with bootstrap intervals; registry gate",
          params=("data_seed", "engine", "evaluate", "registry"),
          deps=(*_PREPARED, P.PREPARED / "test.pt", P.PRETRAINED, *(row.path for row in MODELS)),
          outs=(),
          headline=("accuracy", "accuracy_low", "accuracy_high", "macro_f1", "latency_p50_ms"),
          plots=(PlotFile(P.PLOTS / "evaluate", {"template": "confusion", "x": "actual",
                                                 "y": "predicted"}),),
          datasets=(("test", "evaluation"), ("labeled", "training"))),
)

#: The figures ``dvc plots show`` draws from the stages' plot files.
FIGURES: dict[str, dict[str, Any]] = {
    "pretraining": {"template": "linear", "x": "epoch",
                    "y": {"plots/pretrain.csv": ["train_loss", "knn_acc"]}},
    "fine-tuning (pretrained vs scratch)": {
        "template": "linear", "x": "epoch",
        "y": {"plots/finetune.csv": ["val_acc", "val_loss"],
              "plots/finetune_scratch.csv": ["val_acc", "val_loss"]}},
    "distillation": {"template": "linear", "x": "epoch",
                     "y": {"plots/distill.csv": ["val_acc", "train_kd"]}},
}


def data_stages() -> tuple[Stage, ...]:
    """The stages before the first training stage: what a training seed does not change
    (their params are ``data_seed`` and the data sections, never ``seed``)."""
    first = next(i for i, stage in enumerate(STAGES) if stage.schedule)
    return STAGES[:first]


def recorded_with(name: str) -> list[str]:
    """The stages a stage records on its pipeline's parent run when it finishes: itself and
    those before it (a later stage's lineage may still be an older execution's)."""
    order = [stage.name for stage in STAGES]
    return order[: order.index(name) + 1] if name in order else [name]


def dataset_roles(names: Sequence[str]) -> list[tuple[str, str]]:
    """(split, role) of every split the stages ``names`` read, each with its first role;
    ``prepare``'s ("prepared") only where no other stage read the split."""
    roles: dict[str, str] = {}
    for stage in sorted(STAGES, key=lambda s: s.name == "prepare"):
        if stage.name in names:
            for split, role in stage.datasets:
                roles.setdefault(split, role)
    return list(roles.items())


def stage_named(name: str) -> Stage:
    for stage in STAGES:
        if stage.name == name:
            return stage
    raise KeyError(name)


def stage_for_command(command: str) -> Stage:
    for stage in STAGES:
        if stage.cli == command:
            return stage
    raise KeyError(command)


def commands() -> Iterator[Stage]:
    """One stage per CLI sub-command, in pipeline order."""
    seen: set[str] = set()
    for stage in STAGES:
        if stage.cli not in seen:
            seen.add(stage.cli)
            yield stage


def run(stage: Stage, params: Any, args: Any) -> None:
    """Import the stage's module and run its adapter."""
    importlib.import_module(stage.import_path).main(params, args)


# ----------------------------------------------------------------------- dvc.yaml

REPO = codedeps.SOURCE_ROOT.parent
HEADER = """\
# GENERATED from src/refinery/pipeline.py by `refinery dvc-yaml`: edit the stage
# declarations there, then regenerate (tests/test_stage_list.py fails when this
# file is not current). Every stage is `python -m refinery <stage>`; its code deps
# are the modules its module really imports (src/refinery/codedeps.py).
#
# metrics/<stage>.json: the headline numbers (`dvc metrics show`, `dvc exp show`);
# reports/<stage>/details.json: every number, timings included;
# lineage/<stage>.json: the MLflow run that produced the stage's outputs, so a stage
# DVC restores from its cache still points at the run that made it.
"""


def stage_block(stage: Stage, repo: Path = REPO) -> dict[str, Any]:
    cmd = " ".join(["python -m refinery", stage.cli, *stage.cli_args])
    code = codedeps.code_deps([stage.import_path], repo)
    block: dict[str, Any] = {
        "cmd": cmd,
        "deps": [str(path) for path in stage.deps] + code,
        "params": list(stage.params),
        "outs": [str(path) for path in stage.cached_outs],
        "metrics": [{str(stage.metrics_file): {"cache": False}}],
    }
    if stage.plots:
        block["plots"] = [{str(plot.path): {"cache": False, **plot.options}}
                          for plot in stage.plots]
    return block


def dvc_yaml(repo: Path = REPO) -> str:
    """The text of ``dvc.yaml`` for :data:`STAGES`."""
    document = {"plots": [{name: figure} for name, figure in FIGURES.items()],
                "stages": {stage.name: stage_block(stage, repo) for stage in STAGES}}
    body = yaml.safe_dump(document, sort_keys=False, width=100, default_flow_style=False)
    return HEADER + "\n" + body


def code_dep_drift(dvc_yaml_path: Path, repo: Path = REPO) -> dict[str, list[str]]:
    """Per stage of a ``dvc.yaml``, the source files its module imports that its deps miss."""
    document = yaml.safe_load(dvc_yaml_path.read_text(encoding="utf-8"))
    drift: dict[str, list[str]] = {}
    for stage in STAGES:
        listed = set((document["stages"].get(stage.name) or {}).get("deps", []))
        missing = [path for path in codedeps.code_deps([stage.import_path], repo)
                   if path not in listed]
        if missing:
            drift[stage.name] = missing
    return drift
