"""One list of stages: dvc.yaml is generated from refinery.pipeline.STAGES, the Prefect
flow reads dvc.yaml, and every stage's code deps are the modules it really imports.

Fast (no server): this is the test that fails first when someone adds a
stage to one place and forgets another, or imports a module dvc.yaml misses.
"""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

import pytest
import yaml
from servers import BIN, REPO, isolate_prefect_home, run

isolate_prefect_home()

from pipelines import dvcfile  # noqa: E402
from pipelines.flow import NETWORK_STAGES, pipeline_stages  # noqa: E402
from refinery import codedeps  # noqa: E402
from refinery.pipeline import STAGES, code_dep_drift, dvc_yaml  # noqa: E402

DVC_STAGES = dvcfile.read_stages(REPO / "dvc.yaml")


def test_dvc_yaml_is_generated_from_the_declarations() -> None:
    """The checked-in dvc.yaml is exactly what the declarations and the imports give."""
    assert (REPO / "dvc.yaml").read_text() == dvc_yaml(), (
        "dvc.yaml is out of date: run `.venv/bin/refinery dvc-yaml` and commit it")


def test_a_missing_code_dep_is_caught(tmp_path: Path) -> None:
    """What the generation guards against: a module a stage imports, missing from its deps
    (as formats/prepared.py, then data/prepared.py, once was for seven stages)."""
    document = yaml.safe_load(dvc_yaml())
    document["stages"]["augment"]["deps"].remove("src/refinery/formats/prepared.py")
    stale = tmp_path / "dvc.yaml"
    stale.write_text(yaml.safe_dump(document, sort_keys=False))
    drift = code_dep_drift(stale)
    assert drift == {"augment": ["src/refinery/formats/prepared.py"]}
    assert code_dep_drift(REPO / "dvc.yaml") == {}


_LOADS = """
import importlib, json, multiprocessing as mp, sys

def loads(module):
    importlib.import_module(module)
    return sorted(m for m in sys.modules if m.startswith("refinery"))

if __name__ == "__main__":
    modules = sys.argv[1:]
    with mp.get_context("fork").Pool(2, maxtasksperchild=1) as pool:  # a bare child each
        print(json.dumps(dict(zip(modules, pool.map(loads, modules, chunksize=1)))))
"""


@pytest.mark.slow  # the stage modules import torch: about half a minute on two cores
def test_the_derived_deps_cover_what_importing_each_stage_loads() -> None:
    """A cross-check of the static reading of imports: importing a stage's module in a
    fresh process loads no refinery module (outside the wiring and observability set,
    codedeps.NOT_RESULTS) that its dvc.yaml deps miss."""
    modules = sorted({stage.import_path for stage in STAGES})
    loaded = json.loads(run([str(BIN / "python"), "-c", _LOADS, *modules], REPO).stdout)
    stages = yaml.safe_load(dvc_yaml())["stages"]
    missing = {}
    for stage in STAGES:
        deps = set(stages[stage.name]["deps"])
        for module in loaded[stage.import_path]:
            path = codedeps.module_file(module)
            if path and not codedeps.not_results(module) and \
                    str(path.relative_to(REPO)) not in deps:
                missing.setdefault(stage.name, []).append(module)
    assert missing == {}


def test_names_and_order_match() -> None:
    assert [s.name for s in DVC_STAGES] == [s.name for s in STAGES], (
        "dvc.yaml and refinery.pipeline.STAGES list different stages (or orders)"
    )
    assert pipeline_stages(REPO) == [s.name for s in DVC_STAGES]


@pytest.mark.parametrize("stage", STAGES, ids=lambda s: s.name)
def test_command_and_params_match(stage) -> None:
    dvc = {s.name: s for s in DVC_STAGES}.get(stage.name)
    assert dvc is not None, f"{stage.name} is in STAGES but not in dvc.yaml"
    expected = ["python", "-m", "refinery", stage.cli, *stage.cli_args]
    assert shlex.split(dvc.cmd) == expected
    assert sorted(dvc.params) == sorted(stage.params), (
        f"dvc.yaml params of {stage.name} differ from Stage.params"
    )


@pytest.mark.parametrize("stage", DVC_STAGES, ids=lambda s: s.name)
def test_every_stage_declares_its_lineage(stage) -> None:
    """tracking writes lineage/<stage>.json; DVC must cache it with the stage's outputs."""
    assert f"lineage/{stage.name}.json" in stage.outs


@pytest.mark.parametrize("stage", STAGES, ids=lambda s: s.name)
def test_each_stage_has_a_short_headline_and_a_details_report(stage) -> None:
    """dvc metrics show stays readable: a few headline numbers per stage (per model for
    evaluate); every other number goes to reports/<stage>/details.json, a cached out."""
    assert 1 <= len(stage.headline) <= 5
    dvc = {s.name: s for s in DVC_STAGES}[stage.name]
    assert f"reports/{stage.name}" in dvc.outs
    assert f"metrics/{stage.name}.json" in dvc.outs


def _cached_outputs() -> list[tuple[str, bool]]:
    """(path, cached) of every out, metric and plot file of dvc.yaml."""
    found = []
    for body in yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"].values():
        for kind in ("outs", "metrics", "plots"):
            for item in body.get(kind, []):
                path, options = (item, {}) if isinstance(item, str) else next(iter(item.items()))
                found.append((path, (options or {}).get("cache", True)))
    return found


@pytest.mark.parametrize(("path", "cached"), _cached_outputs(), ids=lambda v: str(v))
def test_git_ignores_exactly_the_outputs_dvc_caches(path: str, cached: bool) -> None:
    """Cached outputs must never reach git (even when DVC dropped its own .gitignore lines
    after a failed run); cache: false metrics and plots are committed with experiments."""
    ignored = run(["git", "check-ignore", "-q", "--no-index", path], REPO, check=False)
    assert (ignored.returncode == 0) == cached, f"{path}: cached={cached}"


def test_dvc_itself_accepts_dvc_yaml(tmp_path: Path) -> None:
    """The flow parses dvc.yaml with plain YAML; DVC's own schema is stricter."""
    shutil.copy(REPO / "dvc.yaml", tmp_path / "dvc.yaml")
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    run([str(BIN / "dvc"), "init", "--no-scm", "-q"], tmp_path)
    listed = run([str(BIN / "dvc"), "stage", "list", "--name-only"], tmp_path).stdout.split()
    assert listed == [s.name for s in DVC_STAGES]


def test_network_stages_exist() -> None:
    assert set(NETWORK_STAGES) <= {s.name for s in DVC_STAGES}


def test_plan_stops_after_and_rejects_unknown(tmp_path: Path) -> None:
    plan = dvcfile.plan(REPO / "dvc.yaml", "validate")
    assert [s.name for s in plan] == [s.name for s in DVC_STAGES][:2]
    with pytest.raises(dvcfile.DvcFileError, match="unknown stage 'nope'"):
        dvcfile.plan(REPO / "dvc.yaml", "nope")


def test_deployments_run_the_flow_on_a_process_pool() -> None:
    config = yaml.safe_load((REPO / "pipelines" / "prefect.yaml").read_text())
    deployments = {d["name"]: d for d in config["deployments"]}
    assert set(deployments) == {"nightly", "on-demand"}
    for deployment in deployments.values():
        path, func = deployment["entrypoint"].split(":")
        assert (REPO / path).exists() and func == "refinery_pipeline"
        assert deployment["work_pool"]["name"] == "refinery-process"
        assert deployment["concurrency_limit"]["limit"] == 1
    assert [s["cron"] for s in deployments["nightly"]["schedules"]] == ["0 2 * * *"]
    assert not deployments["on-demand"]["schedules"]


def test_serve_builds_the_same_deployments() -> None:
    from pipelines.serve import build_deployments

    built = {d.name: d for d in build_deployments()}
    assert set(built) == {"nightly", "on-demand"}
    assert built["nightly"].schedules[0].schedule.cron == "0 2 * * *"
    assert not built["on-demand"].schedules
