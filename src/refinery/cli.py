"""``python -m refinery <stage>``: the one command line behind DVC and Prefect.

Parsing only: the stages are declared in :mod:`refinery.pipeline` (which
imports no stage code, so ``--help`` stays instant); each stage's code and
adapter is ``refinery.stages.<stage>``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from refinery.errors import ParamsError, RefineryError


def build_parser() -> argparse.ArgumentParser:
    from refinery.pipeline import commands

    parser = argparse.ArgumentParser(
        prog="refinery",
        description="Run one stage of the refinery pipeline (DVC and Prefect call these).",
        epilog="Pipeline: " + " -> ".join(stage.cli for stage in commands()),
    )
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of a stage's error (bad data or params), too")
    sub = parser.add_subparsers(dest="stage", metavar="<stage>", required=True)
    for stage in commands():
        stage_parser = sub.add_parser(stage.cli, help=stage.help, description=stage.help)
        for flag, kwargs in stage.arguments:
            stage_parser.add_argument(flag, **kwargs)
    check = sub.add_parser(
        "check-params",
        help="validate params.yaml and exit; with prepared data, also check the whole training "
             "plan (batches, steps, augmentation) against it and show it")
    check.set_defaults(_check=True)
    profile = sub.add_parser(
        "profile",
        help="merge a params profile (cifar10, cifar10-jpeg, image-folder or a YAML file) and "
             "KEY=VALUE overrides into params.yaml, validated first",
    )
    profile.add_argument("name", nargs="?", help="a bundled profile or a YAML file")
    profile.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                         help="a dotted params key and its YAML value (repeatable)")
    profile.set_defaults(_profile=True)
    sync = sub.add_parser(
        "sync-tracking",
        help="send runs spooled while the MLflow server was unreachable (tracking.on_unreachable)",
    )
    sync.set_defaults(_sync=True)
    seeds = sub.add_parser(
        "seeds",
        help="run the pipeline for several training seeds as DVC experiments (data seed "
             "fixed) and summarise them: mean, std, paired differences with t-intervals")
    seeds.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], metavar="S")
    seeds.add_argument("-j", "--jobs", type=int, default=2,
                       help="seeds trained at once (each with cpus/jobs threads)")
    seeds.add_argument("--name", help="experiment names are <name>-seed<S> "
                       "(default: seeds-<date>-<time>)")
    seeds.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="a params override for every seed (repeatable)")
    seeds.add_argument("--existing", action="store_true",
                       help="only summarise experiments <name>-seed<S> that exist already "
                            "(e.g. run on other machines and fetched with dvc exp pull)")
    seeds.set_defaults(_seeds=True)
    dvc_yaml = sub.add_parser(
        "dvc-yaml", help="write dvc.yaml from the stage declarations (src/refinery/pipeline.py)")
    dvc_yaml.add_argument("--check", action="store_true",
                          help="only say whether dvc.yaml is current (exit 1 if not)")
    dvc_yaml.set_defaults(_dvc_yaml=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if getattr(args, "_sync", False):
        return _sync_tracking()
    if getattr(args, "_profile", False):
        return _apply_profile(args)
    if getattr(args, "_dvc_yaml", False):
        return _dvc_yaml(args.check)
    if getattr(args, "_seeds", False):
        from refinery.seeds import command

        try:
            return command(args)
        except RefineryError as exc:
            if args.debug:
                raise
            print(f"refinery seeds: {exc}", file=sys.stderr)
            return 2 if isinstance(exc, ParamsError) else 1
    from refinery.params import load_params
    from refinery.pipeline import run, stage_for_command

    try:
        params = load_params(args.params)
    except ParamsError as exc:
        print(f"refinery: {exc}", file=sys.stderr)
        return 2
    command = "check-params" if getattr(args, "_check", False) else args.stage
    try:
        if command == "check-params":
            return _check_params(args.params, params)
        run(stage_for_command(command), params, args)
    except RefineryError as exc:
        if args.debug:
            raise
        print(f"refinery {command}: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, ParamsError) else 1
    return 0


def _check_params(path: Path, params: object) -> int:
    from refinery import paths
    from refinery.plan import check_prepared, static_problems

    problems = static_problems(params)  # type: ignore[arg-type]
    if problems:
        raise ParamsError(f"{path} cannot work:\n  " + "\n  ".join(problems))
    plan = check_prepared(params, paths.PREPARED)  # type: ignore[arg-type]
    print(f"{path}: ok")
    if plan is None:
        print(f"(no {paths.PREPARED}/meta.json yet: the training plan is checked once "
              "prepare has run)")
    else:
        print(f"training plan on {paths.PREPARED}:\n{plan.describe()}")
    return 0


def _dvc_yaml(check: bool) -> int:
    from refinery import fsutil
    from refinery.pipeline import REPO, dvc_yaml

    target = REPO / "dvc.yaml"
    text = dvc_yaml()
    current = target.exists() and target.read_text(encoding="utf-8") == text
    if check:
        print(f"{target}: {'current' if current else 'out of date: run refinery dvc-yaml'}")
        return 0 if current else 1
    if not current:
        fsutil.write_text(target, text)
    print(f"{target}: {'unchanged' if current else 'written'}")
    return 0


def _sync_tracking() -> int:
    from refinery.tracking import sync_spool

    try:
        report = sync_spool()
    except RefineryError as exc:
        print(f"refinery sync-tracking: {exc}", file=sys.stderr)
        return 1
    print(f"refinery sync-tracking: {report}")
    return 0


def _apply_profile(args: argparse.Namespace) -> int:
    from refinery.profiles import apply_profile, available

    if not args.name and not args.set:
        print(f"refinery profile: give a profile ({', '.join(available())}) or --set KEY=VALUE",
              file=sys.stderr)
        return 2
    try:
        params, changes = apply_profile(args.params, args.name, args.set)
    except ParamsError as exc:
        print(f"refinery profile: {exc}", file=sys.stderr)
        return 2
    print(f"{args.params}: {args.name or 'overrides'} applied (data: {params.download.source}, "
          f"{params.images.side}x{params.images.side}x{params.images.channels}); "
          + (f"{len(changes)} change(s):" if changes else "no change"))
    for change in changes:
        print(f"  {change}")
    return 0
