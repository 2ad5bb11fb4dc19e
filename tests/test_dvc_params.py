"""Every params key reaches DVC's stage hash, so a changed value never restores stale outputs.

DVC 3.67 strips the keys ``size`` and ``nfiles`` (its own out metadata) from
the *whole* lock entry before hashing it for the run-cache, params included
(treeverse/dvc#10296): a stage whose param ``images.size`` changed was
"cached - skipping run" and got the previous value's outputs back. The names
DVC strips are read from DVC itself, and the whole schema (and every shipped
params file) is walked for them.
"""

from __future__ import annotations

import json
import typing
from pathlib import Path

import pytest
import torch
import yaml
from dvc_data.hashfile.meta import Meta
from pydantic import BaseModel
from servers import BIN, run, workspace_copy, workspace_env

from refinery.params import Params
from refinery.profiles import PROFILE_DIR

STRIPPED = frozenset({Meta.PARAM_SIZE, Meta.PARAM_NFILES})  # what _get_cache_hash excludes
REPO = Path(__file__).resolve().parents[1]


def schema_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every dotted key of a params schema, by field name and by alias, nested groups too."""
    keys: list[str] = []
    for name, info in model.model_fields.items():
        for key in {name, info.alias or name}:
            keys.append(prefix + key)
        for kind in (info.annotation, *typing.get_args(info.annotation)):
            if isinstance(kind, type) and issubclass(kind, BaseModel):
                keys.extend(schema_keys(kind, f"{prefix}{info.alias or name}."))
    return keys


def file_keys(data: object, prefix: str = "") -> list[str]:
    if not isinstance(data, dict):
        return []
    keys = []
    for key, value in data.items():
        keys.append(f"{prefix}{key}")
        keys.extend(file_keys(value, f"{prefix}{key}."))
    return keys


def _stripped(keys: list[str]) -> list[str]:
    return [key for key in keys if key.rsplit(".", 1)[-1] in STRIPPED]


def test_no_params_key_is_one_dvc_leaves_out_of_its_hash() -> None:
    assert {"size", "nfiles"} == STRIPPED
    keys = schema_keys(Params)
    assert "images.side" in keys and "download.http.retries" in keys and "validate.rows.train" \
        in keys  # the walk reaches nested groups and aliases
    assert _stripped(keys) == []
    for path in [REPO / "params.yaml", *sorted(PROFILE_DIR.glob("*.yaml"))]:
        assert _stripped(file_keys(yaml.safe_load(path.read_text()))) == [], path


def test_the_walk_would_catch_a_nested_size() -> None:
    class Inner(BaseModel):
        size: int = 1

    class Outer(BaseModel):
        inner: Inner | None = None

    assert _stripped(schema_keys(Outer)) == ["inner.size"]


def _prepared_side(ws: Path) -> int:
    meta = json.loads((ws / "data/prepared/meta.json").read_text())
    images = torch.load(ws / "data/prepared/train.pt", weights_only=True)["images"]
    assert images.shape[-2:] == (meta["size"], meta["size"])
    return meta["size"]


def _set(ws: Path, env: dict[str, str], value: object) -> None:
    run([str(BIN / "refinery"), "profile", "--set", f"images.side={value}"], ws, env)


@pytest.mark.slow
def test_the_image_side_reaches_prepare_through_repro_and_exp_run(tmp_path: Path) -> None:
    ws = workspace_copy(tmp_path / "ws", cache=tmp_path / "cache")
    env = workspace_env(ws)
    dvc = str(BIN / "dvc")
    run([dvc, "repro", "prepare"], ws, env)
    assert _prepared_side(ws) == 8
    _set(ws, env, 12)
    out = run([dvc, "repro", "prepare"], ws, env).stdout
    assert "Running stage 'prepare'" in out
    assert _prepared_side(ws) == 12
    _set(ws, env, 8)  # back to a value the run-cache holds: restored, and right
    out = run([dvc, "repro", "prepare"], ws, env).stdout
    assert "Stage 'prepare' is cached - skipping run" in out
    assert _prepared_side(ws) == 8
    run([dvc, "exp", "run", "prepare", "-S", "images.side=16"], ws, env)
    assert _prepared_side(ws) == 16
    params = (ws / "params.yaml").read_text()
    (ws / "params.yaml").write_text(params.replace("side: 16", "side: -3"))
    failed = run([dvc, "repro", "prepare"], ws, env, check=False)
    assert failed.returncode != 0
    assert "images.side: Input should be greater than or equal to 4" in failed.stderr \
        + failed.stdout
