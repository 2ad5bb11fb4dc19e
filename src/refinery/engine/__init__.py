"""The one training engine: device, AMP, compile, DDP, checkpoints, progress, logging."""

from refinery.engine.checkpoint import Checkpointer, fingerprint
from refinery.engine.data import DeviceData
from refinery.engine.loop import Batch, MetricSink, NullSink, Task, Trainer, TrainOutcome, TrainSpec
from refinery.engine.runtime import Runtime, make_runtime
from refinery.ranks import is_main_process

__all__ = [
    "Batch",
    "Checkpointer",
    "DeviceData",
    "MetricSink",
    "NullSink",
    "Runtime",
    "Task",
    "TrainOutcome",
    "TrainSpec",
    "Trainer",
    "fingerprint",
    "is_main_process",
    "make_runtime",
]
