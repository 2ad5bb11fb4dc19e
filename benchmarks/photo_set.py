"""A small 2-class photo set of variable-size images, made from the shared CIFAR-10 archive.

    .venv/bin/python benchmarks/photo_set.py /tmp/photos.tar.gz            # writes the archive
    .venv/bin/python benchmarks/photo_set.py /tmp/photos.tar.gz --run      # and runs the pipeline

What a user with "a few hundred photos" has: two classes (``--classes``,
default airplane and ship: both often blue backgrounds, not trivially apart),
``--train`` images per class for training and ``--test`` for testing, each
upscaled from 32x32 to a random size of 40..160 px with a random aspect ratio
(bicubic), saved as JPEG. ``--run`` then runs the whole pipeline on it in a
fresh clone with the defaults plus only the image-folder profile's own keys,
and prints every model's test accuracy against the majority baseline; the
figures go to ``docs/results/photo_set.json``.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from common import REPO, SHARED_CIFAR, write_result
from PIL import Image

from refinery.stages.download.fetch import file_digests


def build(out: Path, classes: list[str], train: int, test: int, seed: int) -> str:
    rng = random.Random(seed)
    wanted = {("train", c): train for c in classes} | {("test", c): test for c in classes}
    partial = out.with_name(out.name + ".partial")
    with tarfile.open(SHARED_CIFAR, "r|gz") as source, tarfile.open(partial, "w:gz") as target:
        for member in source:
            if not member.isfile():
                continue
            _, split, label, name = member.name.split("/", 3)
            if wanted.get((split, label), 0) <= 0:
                continue
            wanted[(split, label)] -= 1
            image = Image.open(io.BytesIO(source.extractfile(member).read())).convert("RGB")
            side = rng.randint(40, 160)
            aspect = rng.uniform(0.75, 1.33)
            image = image.resize((max(8, int(side * aspect)), side), Image.Resampling.BICUBIC)
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=rng.randint(75, 95))
            info = tarfile.TarInfo(f"photos/{split}/{label}/{Path(name).stem}.jpg")
            info.size, info.mtime = buffer.tell(), 0
            buffer.seek(0)
            target.addfile(info, buffer)
            if not any(wanted.values()):
                break
    partial.replace(out)
    return file_digests(out)["sha256"]


def run(archive: Path, digest: str) -> dict:
    from refinery.dvctools import tool_env

    bin_dir = Path(sys.executable).parent
    env = tool_env()  # this interpreter's bin first: DVC's `python -m refinery` is ours
    env.pop("MLFLOW_TRACKING_URI", None)  # the clone's own local store
    clone = Path(tempfile.mkdtemp(prefix="refinery-photos-")) / "repo"
    subprocess.run(["git", "clone", "--quiet", str(REPO), str(clone)], check=True)
    subprocess.run([str(bin_dir / "refinery"), "profile", "image-folder",
                    "--set", f"download.url={archive.resolve().as_uri()}",
                    "--set", f"download.checksum=sha256:{digest}"], cwd=clone, check=True,
                   env=env)
    start = time.perf_counter()
    with (clone.parent / "repro.log").open("w") as log:
        done = subprocess.run([str(bin_dir / "dvc"), "repro"], cwd=clone, stdout=log,
                              stderr=subprocess.STDOUT, env=env)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"dvc repro failed; log: {clone.parent / 'repro.log'}")
    metrics = json.loads((clone / "reports/evaluate/details.json").read_text())
    evidence = json.loads((clone / "reports/evaluate/evidence.json").read_text())
    plan = {s: json.loads((clone / f"reports/{s}/details.json").read_text()).get("steps")
            for s in ("pretrain", "finetune", "finetune_scratch", "distill", "prune")}
    print((clone / "reports/evaluate/comparison.md").read_text())
    return {"clone": str(clone), "pipeline_seconds": seconds, "steps": plan,
            "accuracy": {k: v["accuracy"] for k, v in metrics.items()
                         if "accuracy" in v and "_minus_" not in k},  # models and baselines
            "majority": metrics["majority"]["accuracy"],
            "differences": evidence["differences"],
            "not_better_than_majority_by_paired_interval": evidence["not_better_than_majority"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--classes", nargs=2, default=["airplane", "ship"])
    parser.add_argument("--train", type=int, default=110, help="train images per class")
    parser.add_argument("--test", type=int, default=25, help="test images per class")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--run", action="store_true")
    args = parser.parse_args()
    digest = build(args.out, args.classes, args.train, args.test, args.seed)
    print(f"{args.out}: {2 * (args.train + args.test)} images, sha256:{digest}")
    if args.run:
        result = run(args.out, digest)
        margin = {k: 100 * (v - result["majority"]) for k, v in result["accuracy"].items()
                  if k not in ("majority", "chance")}
        print(json.dumps({"points_above_majority": margin, "steps": result["steps"],
                          "pipeline_seconds": result["pipeline_seconds"]}, indent=1))
        path = write_result("photo_set", {
            "command": "python benchmarks/photo_set.py " + " ".join(sys.argv[1:]),
            "classes": args.classes, "train_per_class": args.train,
            "test_per_class": args.test, **result, "points_above_majority": margin,
            "target_points_above_majority": 5.0})
        print(f"written: {path}")


if __name__ == "__main__":
    main()
