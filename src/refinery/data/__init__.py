"""Data stages: download, validate, prepare, and the raw/prepared layouts they share."""
