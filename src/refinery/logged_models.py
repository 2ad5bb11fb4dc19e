"""Every trained model as an MLflow 3 *logged model* of the run that made it.

The stage that writes a model folder (``finetune`` the teacher, ``distill``
the student, ``quantize`` the int8 program, ...) logs it on its own run, with
a signature and an input example, so the run page lists the model and the
experiment's Models tab shows it. Its id goes into the stage's lineage file
(:mod:`refinery.lineage`), which DVC caches with the model: a reused stage
still names the logged model that its restored folder came from. ``evaluate``
then logs each model's test metrics *against* that id and the test data set,
and the registry registers versions from those ids, so a version links back
to the model, its run and its numbers.

While the tracking server is unreachable (``tracking.on_unreachable:
defer``) a training stage logs no model: a model in the spool has an id the
server never sees. ``evaluate`` logs every model whose id the server does not
know (:func:`ensure_logged`) before it scores and registers them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from refinery import models
from refinery.pipeline import ModelRow

log = logging.getLogger(__name__)

INT8_PYFUNC = "refinery.formats.int8_pyfunc"  # MLflow "model from code": saved with the model


def requirements() -> list[str]:
    """What loading a logged model needs: pinned, never inferred (inference imports the
    whole environment and takes seconds)."""
    import mlflow

    return [f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}",
            f"numpy=={np.__version__}"]


def example_images(images: torch.Tensor, count: int = 2) -> np.ndarray:
    """A model's input: float32 images in [0, 1], (N, C, H, W), from uint8 ones."""
    return (images[:count].float() / 255).numpy()


def log_model(run: Any, row: ModelRow, example: np.ndarray, spooled: bool = False) -> str | None:
    """Log the model in ``row.path`` on ``run`` and return its model id. While the run
    is spooled: ``None``, unless ``spooled`` (the registry then registers it in the
    spool too). The id is also kept on the run for its lineage file."""
    import importlib.util

    import mlflow

    with run.active() as live:
        if not live and not spooled:
            log.warning("%s: not logged as an MLflow model while the server is unreachable; "
                        "evaluate logs it when it registers it", row.name)
            return None
        if row.int8:  # a torch.export program: loaded by code saved with the model
            info = mlflow.pyfunc.log_model(
                name=row.name, python_model=importlib.util.find_spec(INT8_PYFUNC).origin,
                artifacts={"program": str(row.file)}, input_example=example,
                pip_requirements=requirements())
        else:
            info = mlflow.pytorch.log_model(
                models.load_model(row.path).eval(), name=row.name, input_example=example,
                pip_requirements=requirements())
    run.models[row.name] = info.model_id
    return str(info.model_id)


def logged_model_ids(workspace: Path | None = None) -> dict[str, str]:
    """Model row name -> logged model id, read from the lineage files of the stages that
    made the model folders now in the workspace (restored ones included)."""
    from refinery import lineage
    from refinery.pipeline import MODELS, STAGES

    ids: dict[str, str] = {}
    for stage in STAGES:
        made = [row.name for row in MODELS if row.path in stage.outs]
        record = lineage.read(stage.name, workspace) if made else None
        if record is not None:
            ids.update({name: record.models[name] for name in made if name in record.models})
    return ids


def ensure_logged(run: Any, rows: Sequence[ModelRow], example: np.ndarray,
                  workspace: Path | None = None) -> dict[str, str]:
    """Row name -> logged model id for every row, on the server ``run`` logs to: the
    ids the stages' lineage files name, when that server knows them; the others (a stage
    that ran while the server was unreachable, or against another server) are logged
    now, on ``run`` (while it is spooled, in the spool)."""
    known = {name: model_id for name, model_id in logged_model_ids(workspace).items()
             if run.has_model(model_id)}
    for row in rows:
        if row.name not in known:
            model_id = log_model(run, row, example, spooled=True)
            if model_id is not None:
                known[row.name] = model_id
    return known
