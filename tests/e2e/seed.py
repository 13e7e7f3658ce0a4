"""The e2e tool Jobs' program, run by the trainer image's Python inside a test namespace.

    seed.py seed --from DIR --to ROOT --long-copies N   DIR's model/ and data/ under ROOT
    seed.py cat FILE                                     a file the runs wrote, to stdout

The standard library only: the trainer image has nothing else of the tests.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path


def seed(source: Path, root: Path, long_copies: int) -> None:
    # ConfigMap volumes hold symlinks into a hidden folder: copy the files they point to.
    for part in ("model", "data"):
        shutil.copytree(source / part, root / part, dirs_exist_ok=True)
    data = root / "data"
    ift = (data / "ift.jsonl").read_text()
    (data / "ift-long.jsonl").write_text(ift * long_copies)  # epochs long enough to act between checkpoints
    print(f"seeded {root}: {sum(1 for p in root.rglob('*') if p.is_file())} files")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="seed.py")
    steps = parser.add_subparsers(dest="step", required=True)
    seeding = steps.add_parser("seed")
    seeding.add_argument("--from", dest="source", type=Path, required=True)
    seeding.add_argument("--to", dest="root", type=Path, required=True)
    seeding.add_argument("--long-copies", type=int, default=1)
    steps.add_parser("cat").add_argument("file", type=Path)
    args = parser.parse_args(argv)
    if args.step == "seed":
        seed(args.source, args.root, args.long_copies)
    else:
        sys.stdout.write(args.file.read_text())


if __name__ == "__main__":
    main()
