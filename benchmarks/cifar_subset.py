"""Write a smaller CIFAR-10 image-folder archive: N train images per class, the full test split.

For benchmarks on machines without a GPU, where training on all 50,000 images
would take hours: the pipeline then runs on the same kind of data, end to end.

    .venv/bin/python benchmarks/cifar_subset.py 500 /tmp/cifar10-500.tar.gz
"""

from __future__ import annotations

import argparse
import collections
import io
import tarfile
from pathlib import Path

from common import SHARED_CIFAR

from refinery.stages.download.fetch import file_digests


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("per_class", type=int)
    parser.add_argument("out", type=Path)
    parser.add_argument("--source", type=Path, default=SHARED_CIFAR)
    args = parser.parse_args()
    counts: collections.Counter[str] = collections.Counter()
    partial = args.out.with_name(args.out.name + ".partial")  # never a half-written archive
    with tarfile.open(args.source, "r|gz") as source, tarfile.open(partial, "w:gz") as target:
        for member in source:
            if not member.isfile():
                continue
            _, split, label, _ = member.name.split("/", 3)  # cifar10-jpeg/<split>/<class>/<file>
            if split == "train":
                if counts[label] >= args.per_class:
                    continue
                counts[label] += 1
            data = source.extractfile(member).read()
            info = tarfile.TarInfo(member.name)
            info.size, info.mtime = len(data), 0
            target.addfile(info, io.BytesIO(data))
    partial.replace(args.out)
    digest = file_digests(args.out)["sha256"]
    print(f"{args.out}: {sum(counts.values())} train images, sha256:{digest}")


if __name__ == "__main__":
    main()
