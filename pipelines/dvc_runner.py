"""Reproduce one DVC stage in a subprocess and turn a failure into the stage's own message.

The flow calls ``dvc repro --single-item <stage>`` rather than the stage code,
so DVC decides whether the stage is stale (code, deps, params) and keeps
``dvc.lock`` as the record of what produced what; a stage that is up to date
costs a ``dvc status``-like check and nothing else. ``--single-item`` because
the flow walks the stages itself, in ``dvc.yaml``'s order.
"""

from __future__ import annotations

import logging
import re
import subprocess
import time
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from refinery.dvctools import dvc_executable

# The CLI's one-line errors: "refinery <stage>: <message>" and, for params,
# "refinery: <file> is invalid:" followed by indented lines naming each key. A stage
# that finds its params infeasible exits 2 (bad data: 1), which DVC repeats.
_CLI_ERROR = re.compile(r"^refinery(?: (?P<command>[\w-]+))?: ")
_DVC_ERROR = re.compile(r"^ERROR: ")
_PARAMS_EXIT = re.compile(r"failed to run: .*, exited with 2$")
_DVC_STATUS = (
    (re.compile(r"^Running stage '"), "ran"),
    (re.compile(r"^Stage '.*' is cached - skipping run"), "restored from run-cache"),
    (re.compile(r"^Stage '.*' didn't change, skipping"), "up to date"),
)


class StageFailed(RuntimeError):
    """A stage's command failed; ``str()`` is the stage's own error message."""

    def __init__(self, stage: str, message: str, params_error: bool = False) -> None:
        super().__init__(message)
        self.stage = stage
        self.params_error = params_error  # bad params: retrying cannot help


@dataclass(frozen=True)
class StageResult:
    stage: str
    dvc: str  # what DVC did: ran | restored from run-cache | up to date | unknown
    seconds: float


def error_message(lines: Iterable[str], returncode: int) -> tuple[str, bool]:
    """The most useful error in a failed stage's output, and whether it is a params error.

    Preference: the CLI's own ``refinery ...:`` error (with its indented
    detail lines), then the last line of a Python traceback, then DVC's
    ``ERROR:`` line (e.g. a broken ``dvc.yaml``).
    """
    lines = [line.rstrip() for line in lines]
    for index in range(len(lines) - 1, -1, -1):
        match = _CLI_ERROR.match(lines[index])
        if match:
            detail = [lines[index]]
            for follow in lines[index + 1 :]:
                if not follow.startswith((" ", "\t")):
                    break
                detail.append(follow)
            params = match.group("command") is None or any(_PARAMS_EXIT.search(line)
                                                           for line in lines)
            return "\n".join(detail), params
    if any(line.startswith("Traceback (most recent call last)") for line in lines):
        tail = [line for line in lines if line and not line.startswith((" ", "\t"))
                and not _DVC_ERROR.match(line)]
        if tail:
            return tail[-1], False
    errors = [line for line in lines if _DVC_ERROR.match(line)]
    if errors:
        return errors[-1].removeprefix("ERROR: "), False
    shown = [line for line in lines if line.strip()]
    return (shown[-1] if shown else f"dvc repro exited with {returncode}"), False


def reproduce(stage: str, workspace: Path, env: Mapping[str, str],
              logger: logging.Logger | logging.LoggerAdapter) -> StageResult:
    """Run ``dvc repro --single-item <stage>`` in ``workspace``, streaming its output."""
    started = time.monotonic()
    command = [dvc_executable(), "repro", "--single-item", stage]
    logger.info("$ dvc %s", " ".join(command[1:]))
    tail: deque[str] = deque(maxlen=400)
    outcome = "unknown"
    with subprocess.Popen(command, cwd=workspace, env=dict(env), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, errors="replace",
                          bufsize=1) as proc:
        assert proc.stdout is not None
        for raw in proc.stdout:
            for line in raw.rstrip("\n").split("\r"):
                if not line.strip():
                    continue
                tail.append(line)
                logger.info("%s", line)
                for pattern, status in _DVC_STATUS:
                    if pattern.match(line):
                        outcome = status
        returncode = proc.wait()
    if returncode != 0:
        message, params_error = error_message(tail, returncode)
        raise StageFailed(stage, message, params_error=params_error)
    return StageResult(stage, outcome, round(time.monotonic() - started, 3))
