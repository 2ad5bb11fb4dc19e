"""Prefect flows over the same stages as dvc.yaml (see pipelines/flow.py)."""
