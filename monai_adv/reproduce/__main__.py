"""``python -m monai_adv.reproduce --dataset_dir DIR --profile {smoke,cpu,paper} --seeds 0 1 2 --output OUT``.

Runs the paper's protocol as one study (see :mod:`monai_adv.study`): trains the five arms (UNet; UNet + FGSM and
UNet + InvFGSM online; the same two by the paper's offline protocol) for every seed with the bundle, evaluates robustness on the test split, and writes ``OUT/results.md`` and
``OUT/results/*.png`` from what it measured. Bundle roots and logs go to ``--work_dir`` (default ``OUT/work``).
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

from monai_adv.hardware import machine_summary
from monai_adv.reproduce.pipeline import Reproduction
from monai_adv.reproduce.profiles import PROFILES
from monai_adv.reproduce.report import write_report

__all__ = ["main", "parse_args"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m monai_adv.reproduce", description=__doc__.splitlines()[0])
    parser.add_argument("--dataset_dir", required=True, help="images/ + masks/ (+ split.json with a test list)")
    parser.add_argument("--profile", choices=sorted(PROFILES), default="smoke")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--output", required=True, help="where results.md and results/ go")
    parser.add_argument("--work_dir", default=None, help="bundle roots and prepared data (default OUTPUT/work)")
    parser.add_argument("--max_epochs", type=int, default=None, help="override the profile's training length")
    parser.add_argument("--bundle_dir", default=None, help="the bundle (default: bundles/ here or in the checkout)")
    return parser.parse_args(argv)


def code_version(root: str | os.PathLike | None = None) -> str:
    """``git describe`` and commit of the code that ran (``unknown`` outside a git checkout).

    ``-dirty`` marks uncommitted changes to tracked files outside ``docs/``: the pages and figures that the runners
    write there are their output, and a page regenerated over its last version is not code that differs from the
    commit.

    Args:
        root: the checkout (default: the one monai_adv was imported from, if it is one).
    """
    root = Path(root) if root is not None else Path(__file__).resolve().parents[2]

    def git(*args: str) -> str:
        # bounded: a git waiting on a lock or a credential prompt must not hold up the study it labels
        command = ["git", *args]
        return subprocess.run(command, cwd=root, capture_output=True, text=True, check=True, timeout=60).stdout.strip()

    try:
        describe, commit = git("describe", "--always", "--tags"), git("rev-parse", "HEAD")
        changed = git("status", "--porcelain", "--untracked-files=no", "--", ":(top)", ":(top,exclude)docs")
    except subprocess.TimeoutExpired:
        return "unknown (git did not answer in 60 s)"
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return f"{describe}{'-dirty' if changed else ''} (commit {commit})"


def dataset_citation(dataset_dir: Path) -> str | None:
    """The citation paragraph of the dataset's ``SOURCE.md`` (its "Terms and citation" section), if any."""
    source = dataset_dir / "SOURCE.md"
    if not source.is_file():
        return None
    text = source.read_text()
    match = re.search(r"## Terms and citation\n(.*?)(\n## |\Z)", text, re.DOTALL)
    body = " ".join((match.group(1) if match else "").split())
    kvasir = "kvasir" in text.lower()
    note = ("Kvasir-SEG: real colonoscopy images of polyps (endoscopy, RGB), not the paper's private colon-cancer CT "
            "images; results on one do not transfer to the other. ") if kvasir else ""  # fmt: skip
    return note + body if body else (note or None)


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    start = time.perf_counter()
    output = Path(args.output)
    work_dir = Path(args.work_dir) if args.work_dir else output / "work"
    profile = PROFILES[args.profile]
    if not profile.offline:
        raise SystemExit(
            f"the reproduction's offline arms cannot run on profile {profile.name} (run augment refuses z-scored "
            f"volumes): run its online arms as a study, `python -m monai_adv.study hippocampus_recipes --seeds 0 1 2 "
            f"--output OUT`."
        )
    reproduction = Reproduction(args.dataset_dir, profile, args.seeds, work_dir, max_epochs=args.max_epochs,
                                bundle_dir=args.bundle_dir)  # fmt: skip
    results = reproduction.run()
    command = shlex.join(["python", "-m", "monai_adv.reproduce", *(sys.argv[1:] if argv is None else argv)])
    context = {
        "command": command,
        "version": code_version(),
        "machine": machine_summary(),
        "wall_time_s": time.perf_counter() - start,
        "profile": profile,
        "max_epochs": reproduction.max_epochs,
        "timings": reproduction.timings,
        "counts": reproduction.counts,
        "dataset_dir": args.dataset_dir,
        "source": dataset_citation(Path(args.dataset_dir)),
        "commands": reproduction.commands,
        "resumed": reproduction.resumed,
    }
    path = write_report(results, output, context)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
