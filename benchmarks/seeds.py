"""Five seeds of the digits default from one command, two at a time, against one seed.

    python benchmarks/seeds.py       # prints the figures, writes docs/results/digits_seeds.json
    python benchmarks/seeds.py --seeds 0 1 2 --jobs 2 --set finetune.epochs=10

Two fresh clones of the committed repository, each with its own DVC cache and
MLflow store: in the first, ``dvc repro`` (one seed, every stage); in the
second, ``refinery seeds --seeds ... --jobs ...`` (the first seed alone, the
rest ``jobs`` at a time, data stages restored from the run-cache). Target:
five seeds in under 4x the time of one. The seeds' summary (mean, std,
paired differences with t-intervals) is copied into the JSON, so README's
multi-seed table is read from it.
"""

from __future__ import annotations

import argparse
import csv
import io
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, write_result


def _clone(dst: Path) -> Path:
    subprocess.run(["git", "clone", "--quiet", str(REPO), str(dst)], check=True)
    return dst


def _timed(command: list[str], cwd: Path, log: Path) -> float:
    start = time.perf_counter()
    with log.open("w") as sink:
        done = subprocess.run(command, cwd=cwd, stdout=sink, stderr=subprocess.STDOUT,
                              env=_env(), check=False)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} failed ({done.returncode}); log: {log}")
    return seconds


def _env() -> dict[str, str]:
    from refinery.dvctools import tool_env

    env = tool_env()
    env.pop("MLFLOW_TRACKING_URI", None)  # each clone's own local store
    return env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("-j", "--jobs", type=int, default=2)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    bin_dir = Path(sys.executable).parent
    work = Path(tempfile.mkdtemp(prefix="refinery-seeds-bench-"))
    one = _clone(work / "one")
    many = _clone(work / "many")
    sets = [f"-S{item}" for item in args.set]
    if sets:  # the one-seed run gets the same overrides, as an experiment
        one_cmd = [str(bin_dir / "dvc"), "exp", "run", "-n", "one", *sets]
    else:
        one_cmd = [str(bin_dir / "dvc"), "repro"]
    print(f"one seed: {' '.join(one_cmd)} in {one}", flush=True)
    one_s = _timed(one_cmd, one, work / "one.log")
    print(f"one seed: {one_s:.0f} s", flush=True)
    seeds_cmd = [str(bin_dir / "refinery"), "seeds", "--seeds", *map(str, args.seeds),
                 "--jobs", str(args.jobs), "--name", "bench", *(f"--set={s}" for s in args.set)]
    print(f"{len(args.seeds)} seeds: {' '.join(seeds_cmd)} in {many}", flush=True)
    many_s = _timed(seeds_cmd, many, work / "many.log")
    ratio = many_s / one_s
    print(f"{len(args.seeds)} seeds, {args.jobs} at a time: {many_s:.0f} s = {ratio:.2f}x one "
          f"seed (target < 4x)", flush=True)
    summary_md = (many / "reports/seeds/summary.md").read_text()
    rows = list(csv.DictReader(io.StringIO((many / "reports/seeds/summary.csv").read_text())))
    print(summary_md)
    pretraining = next(r for r in rows if r["row"] == "teacher - scratch")
    path = write_result("digits_seeds", {
        "command": "python benchmarks/seeds.py " + " ".join(sys.argv[1:]),
        "seeds": args.seeds, "jobs": args.jobs, "overrides": args.set,
        "teacher_minus_scratch_mean": 100 * float(pretraining["mean"]),
        "teacher_minus_scratch_ci95": [100 * float(pretraining["ci_low"]),
                                       100 * float(pretraining["ci_high"])],
        "pipeline_seconds": one_s,
        "one_seed_seconds": one_s, "seeds_seconds": many_s, "ratio": ratio,
        "target_ratio": 4.0, "summary": rows, "summary_markdown": summary_md})
    print(f"written: {path}; clones and logs in {work}")


if __name__ == "__main__":
    main()
