"""Stage code: stage X is the function X in refinery.stages.X (see refinery.stage)."""
