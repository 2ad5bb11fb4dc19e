"""Params profiles: a data set switch is one command, not a hand-edit of ten keys.

A profile (``src/refinery/profiles/<name>.yaml``, or any YAML file) holds only
the keys that differ from the defaults. :func:`apply_profile` merges it (and
any ``key=value`` overrides) into ``params.yaml``, validates the result with
the same schema as every stage, and rewrites the file atomically with its
comments kept (ruamel round-trip), the way ``dvc exp run -S`` edits it.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from ruamel.yaml import YAML

from refinery import fsutil
from refinery.params import Params, ParamsError, apply_overrides, flatten, parse_params

PROFILE_DIR = Path(__file__).with_name("profiles")


def available() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))


def profile_path(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and path.exists():
        return path
    bundled = PROFILE_DIR / f"{name_or_path}.yaml"
    if bundled.exists():
        return bundled
    raise ParamsError(f"no profile {name_or_path!r}: expected one of {available()} or a YAML "
                      "file")


def parse_assignments(assignments: list[str]) -> dict[str, Any]:
    """``["a.b=3", "c=null"]`` -> ``{"a.b": 3, "c": None}`` (values parsed as YAML)."""
    overrides: dict[str, Any] = {}
    for item in assignments:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ParamsError(f"{item!r}: expected key=value")
        overrides[key.strip()] = yaml.safe_load(value)
    return overrides


def _flow(value: Any) -> Any:
    """Lists as ``[a, b]`` like the rest of params.yaml, not one item per line."""
    if isinstance(value, list | tuple):
        from ruamel.yaml.comments import CommentedSeq

        seq = CommentedSeq(value)
        seq.fa.set_flow_style()
        return seq
    return value


def _set(document: Any, dotted: str, value: Any) -> None:
    value = _flow(value)
    node = document
    parts = dotted.split(".")
    for part in parts[:-1]:
        if part not in node or node[part] is None:
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value


@dataclass(frozen=True)
class Change:
    key: str
    old: Any
    new: Any

    def __str__(self) -> str:
        return f"{self.key}: {json.dumps(self.old)} -> {json.dumps(self.new)}"


def apply_profile(params_file: Path, profile: str | None,
                  assignments: list[str] | None = None) -> tuple[Params, list[Change]]:
    """Merge a profile and ``key=value`` overrides into ``params_file``; validate; write.

    Returns the new params and every key whose value changed (a profile applied
    again resets what an earlier ``--set`` changed: the caller shows that).
    """
    overrides: dict[str, Any] = {}
    if profile:
        loaded = yaml.safe_load(profile_path(profile).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ParamsError(f"profile {profile!r} is not a mapping of params")
        overrides.update(flatten(loaded))
    overrides.update(parse_assignments(assignments or []))
    raw = yaml.safe_load(params_file.read_text()) or {}
    before = flatten(parse_params(raw, source=str(params_file)).to_dict())
    params = parse_params(apply_overrides(raw, overrides), source=f"{params_file} + profile")
    after = flatten(params.to_dict())
    changes = [Change(key, before.get(key), after[key]) for key in after
               if before.get(key) != after[key]]
    round_trip = YAML()
    round_trip.preserve_quotes = True
    round_trip.width = 4096  # never wrap a long value onto its own line
    round_trip.representer.add_representer(  # `null`, as the file writes it, not an empty value
        type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null"))
    document = round_trip.load(params_file.read_text())
    for key, value in overrides.items():
        _set(document, key, value)
    buffer = io.StringIO()
    round_trip.dump(document, buffer)
    fsutil.write_text(params_file, buffer.getvalue())
    return params, changes
