"""Repeated training seeds: run the pipeline once per seed, then say what holds across them.

One run's difference between two models mixes the effect with the luck of
one initialisation and one batch order. ``refinery seeds`` runs the
pipeline for N training seeds as DVC experiments, each a normal experiment
in ``dvc exp show`` (``dvc exp run --queue -S seed=<s>``, then ``dvc queue
start -j <jobs>``). ``data_seed`` stays fixed, so the data stages' params do
not change with the seed: they run once first (``dvc repro`` of the last data
stage in the workspace; or, when ``--set`` changes a data param, the first seed
runs alone), and every seed restores them from DVC's run-cache, the seeds
training ``jobs`` at a time, each worker with ``cpus / jobs`` threads.

:func:`summarize` gathers the seeds' test metrics: mean, standard deviation
(n - 1) and range per model and baseline, and for each declared comparison
(:data:`refinery.pipeline.MODELS`' ``compared_to``) the paired differences
seed by seed with a Student-t interval of their mean. Written as
``reports/seeds/summary.md``, ``.csv`` and ``.png`` (accuracy per model with
error bars), and logged to MLflow as a parent run whose children are the
seeds' pipeline runs (:func:`refinery.tracking.record_seeds`).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from refinery import fsutil
from refinery.dvctools import dvc_executable, tool_env
from refinery.errors import ParamsError, RefineryError

log = logging.getLogger(__name__)

REPORT_DIR = Path("reports") / "seeds"
METRICS_FILE = "metrics/evaluate.json"
#: What each seed is summarised by, per model (the evaluate stage's metric names).
SUMMARIZED = ("accuracy", "macro_f1")


# ---------------------------------------------------------------------- statistics


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def _std(values: Sequence[float]) -> float:
    """Sample standard deviation (n - 1); 0 for one value."""
    if len(values) < 2:
        return 0.0
    mean = _mean(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


@dataclass(frozen=True)
class ModelSummary:
    name: str
    metric: str
    values: tuple[float, ...]  # one per seed, in seed order

    @property
    def mean(self) -> float:
        return _mean(self.values)

    @property
    def std(self) -> float:
        return _std(self.values)


@dataclass(frozen=True)
class PairedDifference:
    name: str
    compared_to: str
    step: str
    differences: tuple[float, ...]  # accuracy by seed
    level: float = 0.95

    @property
    def mean(self) -> float:
        return _mean(self.differences)

    @property
    def std(self) -> float:
        return _std(self.differences)

    @property
    def interval(self) -> tuple[float, float]:
        """Student-t interval of the mean difference (n - 1 degrees of freedom); NaN for
        one seed, where there is no spread to measure."""
        from scipy import stats

        n = len(self.differences)
        if n < 2:
            return (math.nan, math.nan)
        half = float(stats.t.ppf(0.5 + self.level / 2, n - 1)) * self.std / math.sqrt(n)
        return (self.mean - half, self.mean + half)

    @property
    def distinguishable(self) -> bool:
        low, high = self.interval
        return not (low <= 0.0 <= high) and not math.isnan(low)


@dataclass(frozen=True)
class SeedSummary:
    seeds: tuple[int, ...]
    models: tuple[ModelSummary, ...]
    differences: tuple[PairedDifference, ...]

    def model(self, name: str, metric: str = "accuracy") -> ModelSummary:
        return next(m for m in self.models if m.name == name and m.metric == metric)

    def metrics(self) -> dict[str, float]:
        """Flat numbers for MLflow: ``<model>.<metric>_mean``/``_std``, differences' means
        and interval ends."""
        out: dict[str, float] = {"seeds": float(len(self.seeds))}
        for m in self.models:
            out[f"{m.name}.{m.metric}_mean"] = m.mean
            out[f"{m.name}.{m.metric}_std"] = m.std
        for d in self.differences:
            low, high = d.interval
            key = f"{d.name}_minus_{d.compared_to}.accuracy"
            out.update({f"{key}_mean": d.mean, f"{key}_low": low, f"{key}_high": high})
        return {k: v for k, v in out.items() if not math.isnan(v)}


def summarize(per_seed: Mapping[int, Mapping[str, Mapping[str, float]]],
              comparisons: Sequence[tuple[str, str, str]], level: float = 0.95,
              order: Sequence[str] = ()) -> SeedSummary:
    """``per_seed[seed][model][metric]`` -> per-model statistics and paired differences.

    Models are those every seed measured (``evaluate``'s nested metrics: models and
    baselines; the difference groups are left out). ``comparisons``:
    ``(model, compared_to, step)``; a difference is taken seed by seed, so the luck a
    seed gives both models cancels.
    """
    seeds = tuple(sorted(per_seed))
    if not seeds:
        raise ValueError("no seeds to summarize")
    first = per_seed[seeds[0]]
    names = [name for name, values in first.items()
             if "_minus_" not in name and all(name in per_seed[s] for s in seeds)
             and "accuracy" in values]
    rank = {name: index for index, name in enumerate(order)}
    names.sort(key=lambda name: rank.get(name, len(rank)))
    models = tuple(ModelSummary(name, metric, tuple(float(per_seed[s][name][metric])
                                                    for s in seeds))
                   for name in names for metric in SUMMARIZED
                   if all(metric in per_seed[s][name] for s in seeds))
    differences = tuple(
        PairedDifference(a, b, step, tuple(float(per_seed[s][a]["accuracy"])
                                           - float(per_seed[s][b]["accuracy"]) for s in seeds),
                         level)
        for a, b, step in comparisons if a in names and b in names)
    return SeedSummary(seeds, models, differences)


# ------------------------------------------------------------------------- reports


def summary_markdown(summary: SeedSummary, name: str, command: str) -> str:
    n = len(summary.seeds)
    lines = [f"# Seeds: {name}", "",
             f"{n} training seeds ({', '.join(map(str, summary.seeds))}), data seed fixed; "
             f"test accuracy and macro F1 in %, mean ± std (n - 1) and min–max.", "",
             f"Command: `{command}`", "",
             "| model | accuracy % | min–max | macro F1 % |", "|---|---:|---:|---:|"]
    for m in summary.models:
        if m.metric != "accuracy":
            continue
        f1 = next((x for x in summary.models if x.name == m.name and x.metric == "macro_f1"),
                  None)
        f1_text = "–" if f1 is None else f"{100 * f1.mean:.2f} ± {100 * f1.std:.2f}"
        lines.append(f"| {m.name} | {100 * m.mean:.2f} ± {100 * m.std:.2f} | "
                     f"{100 * min(m.values):.2f}–{100 * max(m.values):.2f} | {f1_text} |")
    lines += ["", f"Paired differences (accuracy points, seed by seed; "
              f"{summary.differences[0].level:.0%} t-interval of the mean):"
              if summary.differences else "", ""]
    for d in summary.differences:
        low, high = d.interval
        by_seed = ", ".join(f"{100 * x:+.2f}" for x in d.differences)
        if math.isnan(low):
            verdict = "one seed: no interval"
        else:
            verdict = (f"CI {100 * low:+.2f} to {100 * high:+.2f}: "
                       + ("distinguishable from 0" if d.distinguishable
                          else "not distinguishable from 0"))
        lines.append(f"- {d.step}: {d.name} minus {d.compared_to} = {100 * d.mean:+.2f} "
                     f"± {100 * d.std:.2f} ({verdict}); by seed: {by_seed}")
    return "\n".join(lines) + "\n"


def summary_csv(summary: SeedSummary) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    seeds = [f"seed_{s}" for s in summary.seeds]
    writer.writerow(["row", "metric", "mean", "std", "min", "max", "ci_low", "ci_high", *seeds])
    for m in summary.models:
        writer.writerow([m.name, m.metric, m.mean, m.std, min(m.values), max(m.values), "", "",
                         *m.values])
    for d in summary.differences:
        low, high = d.interval
        writer.writerow([f"{d.name} - {d.compared_to}", "accuracy", d.mean, d.std,
                         min(d.differences), max(d.differences),
                         "" if math.isnan(low) else low, "" if math.isnan(high) else high,
                         *d.differences])
    return buffer.getvalue()


def plot_summary(summary: SeedSummary, path: Path, title: str) -> Path:
    """Accuracy per model: mean with ±1 std error bars, every seed as a dot."""
    from refinery.stages.evaluate.metrics import _figure, _save

    rows = [m for m in summary.models if m.metric == "accuracy"]
    figure, ax = _figure(max(5.0, 1.0 * len(rows) + 2), 4.0)
    xs = range(len(rows))
    ax.bar(xs, [100 * m.mean for m in rows], yerr=[100 * m.std for m in rows], capsize=5,
           color="tab:blue", alpha=0.6, label="mean ± std")
    for x, m in zip(xs, rows, strict=True):
        ax.scatter([x] * len(m.values), [100 * v for v in m.values], color="black", s=12,
                   zorder=3, label="one seed" if x == 0 else None)
    ax.set_xticks(list(xs), labels=[m.name for m in rows], rotation=30, ha="right")
    low = min(100 * min(m.values) for m in rows)
    ax.set_ylim(max(0.0, low - 10), 100)
    ax.set_ylabel("test accuracy %")
    ax.set_title(title)
    ax.legend(loc="lower right")
    return _save(figure, path)


def write_reports(summary: SeedSummary, name: str, command: str,
                  out_dir: Path = REPORT_DIR) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    return [
        fsutil.write_text(out_dir / "summary.md", summary_markdown(summary, name, command)),
        fsutil.write_text(out_dir / "summary.csv", summary_csv(summary)),
        plot_summary(summary, out_dir / "summary.png",
                     f"{name}: {len(summary.seeds)} seeds"),
    ]


# ------------------------------------------------------------------- running seeds


def experiment_names(name: str, seeds: Sequence[int]) -> list[str]:
    return [f"{name}-seed{seed}" for seed in seeds]


FINISHED = frozenset({"Success", "Failed"})


def queue_states(status: str) -> dict[str, str]:
    """Experiment name -> state, from ``dvc queue status``'s table (name: 2nd column,
    state: last)."""
    states = {}
    for line in status.splitlines():
        parts = line.split()
        if len(parts) >= 4 and parts[-1] in (*FINISHED, "Queued", "Running"):
            states[parts[1]] = parts[-1]
    return states


def experiment_refs(repo: Path) -> dict[str, str]:
    """Experiment name -> git ref (``refs/exps/<baseline>/<name>``)."""
    out = _git(["for-each-ref", "--format=%(refname)", "refs/exps"], repo)
    return {ref.rsplit("/", 1)[-1]: ref for ref in out.split() if ref.count("/") >= 4}


def experiment_metrics(repo: Path, ref: str) -> dict[str, Any]:
    """The experiment's committed ``metrics/evaluate.json`` (DVC metrics are in git)."""
    return json.loads(_git(["show", f"{ref}:{METRICS_FILE}"], repo))


@dataclass(frozen=True)
class SeedRun:
    name: str
    seeds: tuple[int, ...]
    experiments: tuple[str, ...]
    per_seed: dict[int, dict[str, Any]]
    seconds: float


def warm_data(overrides: Mapping[str, Any], repo: Path) -> bool:
    """Bring the data stages up to date in the workspace (``dvc repro <last data stage>``),
    so every seed restores them from the run-cache. Only when ``overrides`` leave the
    data params alone (else the seeds' data differs from the workspace's): returns
    whether it did."""
    from refinery.pipeline import data_stages

    stages = data_stages()
    keys = {key for stage in stages for key in stage.params}
    if any(k == key or k.startswith(key + ".") for k in overrides for key in keys):
        return False
    _dvc(["repro", stages[-1].name], repo)
    return True


def run_seeds(seeds: Sequence[int], *, name: str, jobs: int, overrides: Mapping[str, Any],
              repo: Path, on_state: Callable[[str], None] | None = None) -> SeedRun:
    """Queue one DVC experiment per seed and run them ``jobs`` at a time, after the data
    stages (:func:`warm_data`, else the first seed alone); return each seed's evaluation
    metrics. A failed seed fails the whole call, with its log."""
    check(seeds, name, jobs, overrides, repo)
    names = experiment_names(name, seeds)
    start = time.perf_counter()
    if warm_data(overrides, repo):
        if on_state is not None:
            on_state("data stages up to date in the workspace")
        batches = [(list(seeds), names, jobs)]
    else:
        batches = [(seeds[:1], names[:1], 1), (seeds[1:], names[1:], jobs)]
    for batch_seeds, batch_names, workers in batches:
        if not batch_seeds:
            continue
        for seed, experiment in zip(batch_seeds, batch_names, strict=True):
            _dvc(["exp", "run", "--queue", "-n", experiment, *_set_args(seed, overrides)],
                 repo)
        _start_and_wait(batch_names, workers, repo, on_state)
    refs = experiment_refs(repo)
    per_seed = {seed: experiment_metrics(repo, refs[experiment])
                for seed, experiment in zip(seeds, names, strict=True)}
    return SeedRun(name, tuple(seeds), tuple(names), per_seed, time.perf_counter() - start)


def run_one(seed: int, *, name: str, overrides: Mapping[str, Any], repo: Path,
            threads: int) -> dict[str, Any]:
    """One seed as ``dvc exp run --temp`` (a normal experiment, made in a temporary copy;
    several may run at once, as the Prefect seeds flow does); its evaluation metrics."""
    experiment = experiment_names(name, [seed])[0]
    env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    _dvc(["exp", "run", "--temp", "-n", experiment, *_set_args(seed, overrides)], repo, env)
    return experiment_metrics(repo, experiment_refs(repo)[experiment])


def _set_args(seed: int, overrides: Mapping[str, Any]) -> list[str]:
    args = ["-S", f"seed={seed}"]
    for key, value in overrides.items():
        args += ["-S", f"{key}={json.dumps(value)}"]
    return args


def check(seeds: Sequence[int], name: str, jobs: int, overrides: Mapping[str, Any],
           repo: Path) -> None:
    """Everything that can be wrong before any work: seeds, name, params."""
    import yaml

    from refinery.params import apply_overrides, parse_params

    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise ParamsError(f"seeds must be distinct non-negative integers, got {list(seeds)}")
    if jobs < 1:
        raise ParamsError(f"--jobs must be >= 1, got {jobs}")
    if "seed" in overrides:
        raise ParamsError("seed is what `refinery seeds` varies; give the seeds with --seeds")
    raw = yaml.safe_load((repo / "params.yaml").read_text())
    parse_params(apply_overrides(raw, {**overrides, "seed": max(seeds)}))
    taken = set(experiment_refs(repo)) & set(experiment_names(name, seeds))
    if taken:
        raise ParamsError(f"experiments {sorted(taken)} exist already: choose another --name "
                          "or remove them (dvc exp remove)")


def _start_and_wait(names: Sequence[str], jobs: int, repo: Path,
                    on_state: Callable[[str], None] | None, poll_s: float = 3.0) -> None:
    threads = str(max(1, (os.cpu_count() or 1) // jobs))
    env = {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    # The workers outlive `dvc queue start` and inherit its stdout: a pipe there would
    # block until the queue is empty, so its output goes to a file.
    log_file = repo / ".dvc" / "tmp" / "refinery-seeds-queue.log"
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with log_file.open("ab") as sink:
        started = subprocess.run([dvc_executable(), "queue", "start", "-j", str(jobs)],
                                 cwd=repo, env=tool_env(env), stdout=sink,
                                 stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 check=False)
    if started.returncode != 0:
        raise RefineryError(f"dvc queue start failed ({started.returncode}): "
                            f"{log_file.read_text(errors='replace')[-2000:]}")
    seen: dict[str, str] = {}
    try:
        while True:
            states = queue_states(_dvc(["queue", "status"], repo))
            for experiment in names:
                state = states.get(experiment, "?")
                if seen.get(experiment) != state and on_state is not None:
                    on_state(f"{experiment}: {state}")
                seen[experiment] = state
            if all(seen[n] in FINISHED for n in names):
                break
            time.sleep(poll_s)
    except BaseException:
        subprocess.run([dvc_executable(), "queue", "kill", *names], cwd=repo, env=tool_env(),
                       capture_output=True, check=False)
        raise
    failed = [n for n in names if seen[n] != "Success"]
    if failed:
        logs = "\n".join(f"--- {n} ---\n{_dvc(['queue', 'logs', n], repo, check=False)[-3000:]}"
                         for n in failed)
        raise RefineryError(f"{len(failed)} of {len(names)} seed experiments failed: "
                            f"{', '.join(failed)}\n{logs}")


def _dvc(args: Sequence[str], repo: Path, env: Mapping[str, str] | None = None,
         check: bool = True) -> str:
    done = subprocess.run([dvc_executable(), *args], cwd=repo, env=tool_env(env),
                          capture_output=True, text=True, check=False)
    if check and done.returncode != 0:
        raise RefineryError(f"dvc {' '.join(args)} failed ({done.returncode}):\n"
                            f"{(done.stdout + done.stderr)[-3000:]}")
    return done.stdout + done.stderr


def _git(args: Sequence[str], repo: Path) -> str:
    done = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RefineryError(f"git {' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout


# ------------------------------------------------------------------------- command


def publish(result: SeedRun, overrides: Mapping[str, Any], invocation: str,
            repo: Path) -> tuple[SeedSummary, Any, str]:
    """Summarise the seeds, write ``reports/seeds/`` and record the MLflow parent run.

    Returns the summary, the :class:`refinery.tracking.SeedsRecord` and the markdown.
    """
    import yaml

    from refinery import tracking
    from refinery.params import apply_overrides, parse_params
    from refinery.pipeline import MODELS

    params = parse_params(apply_overrides(yaml.safe_load((repo / "params.yaml").read_text()),
                                          dict(overrides)))
    comparisons = [(r.name, r.compared_to, r.step) for r in MODELS if r.compared_to]
    from refinery.stages.evaluate.baselines import NAMES as BASELINES

    order = [r.name for r in MODELS] + list(BASELINES)
    summary = summarize(result.per_seed, comparisons, level=params.evaluate.bootstrap.level,
                        order=order)
    files = write_reports(summary, result.name, invocation, repo / REPORT_DIR)
    record = tracking.record_seeds(
        params.tracking.experiment, result.name,
        params={"seeds": ",".join(map(str, result.seeds)),
                "overrides": json.dumps(dict(overrides), sort_keys=True),
                "command": invocation},
        metrics={**summary.metrics(), "wall_seconds": result.seconds},
        artifacts=files, experiments=result.experiments)
    return summary, record, summary_markdown(summary, result.name, invocation)


def existing(seeds: Sequence[int], name: str, repo: Path) -> SeedRun:
    """The seeds' experiments as they are (run elsewhere, fetched with ``dvc exp pull``)."""
    refs = experiment_refs(repo)
    names = experiment_names(name, seeds)
    missing = [n for n in names if n not in refs]
    if missing:
        raise RefineryError(f"no DVC experiments {missing} here (dvc exp pull them first?)")
    return SeedRun(name, tuple(seeds), tuple(names),
                   {s: experiment_metrics(repo, refs[n]) for s, n in zip(seeds, names,
                                                                         strict=True)}, 0.0)


def command(args: Any) -> int:
    """``refinery seeds``: run (or, with ``--existing``, collect) the seeds, then
    :func:`publish` them."""
    import shlex
    import sys

    from refinery.profiles import parse_assignments

    repo = Path.cwd()
    overrides = parse_assignments(args.set)
    name = args.name or time.strftime("seeds-%Y%m%d-%H%M%S")
    seeds = list(args.seeds)
    if args.existing:
        result = existing(seeds, name, repo)
    else:
        result = run_seeds(seeds, name=name, jobs=args.jobs, overrides=overrides, repo=repo,
                           on_state=lambda line: print(f"refinery seeds: {line}", flush=True))
    invocation = "refinery " + shlex.join(sys.argv[1:]) if sys.argv[1:] else "refinery seeds"
    _, record, markdown = publish(result, overrides, invocation, repo)
    print(markdown)
    print(f"refinery seeds: {len(seeds)} seeds in {result.seconds:.0f} s; reports in "
          f"{REPORT_DIR}/; MLflow run {record.url or record.run_id}"
          + (f" (pipeline runs not found for {record.missing})" if record.missing else ""))
    return 0
