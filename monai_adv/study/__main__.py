"""``python -m monai_adv.study STUDY.json --seeds 0 1 2 --output OUT``.

Runs every arm of the study (a JSON file, or the name of one shipped in ``monai_adv/study/studies``) for every
seed with the bundle, evaluates each on the test split with ``run robustness``, and writes the study's page,
figures, ``summary.json`` and the collected results (``raw_results.json``) under ``OUT``. Bundle roots, prepared
data and markers go to ``--work_dir`` (default ``OUT/work/<study name>``). Run it again to continue a study that
was stopped: arms and seeds whose results are in ``OUT/<name>/raw_results.json`` with the same settings are not
run again (even without the work folder), within an arm, completed steps are not run again, a training stopped
part way continues from its latest checkpoint, and a robustness step after its last finished batch (the bundle's
``progress_file``).
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import time
from pathlib import Path

from monai_adv.study.report import write_study_report
from monai_adv.study.runner import StudyRunner
from monai_adv.study.spec import load_study

__all__ = ["main", "parse_args"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m monai_adv.study", description=__doc__.splitlines()[0])
    parser.add_argument("study", help="a study JSON file, or the name of a study shipped with monai_adv")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--output", required=True, help="where the page, its figures and summary.json go")
    parser.add_argument("--dataset_dir", default=None, help="the data (default: the study file's dataset_dir)")
    parser.add_argument("--work_dir", default=None, help="bundle roots and prepared data (default OUTPUT/work/NAME)")
    parser.add_argument("--bundle_dir", default=None, help="the bundle (default: bundles/ here or in the checkout)")
    parser.add_argument("--arms", nargs="+", default=None, help="run only these arms (and those they build on)")
    parser.add_argument("--max_epochs", type=int, default=None, help="override the arms' training length")
    parser.add_argument("--no_tracking", action="store_true", help="train without --tracking mlflow")
    parser.add_argument("--report_only", action="store_true", help="write the page from the results there are")
    return parser.parse_args(argv)


def _shown_path(path: str) -> str:
    """``path`` relative to the working directory where it lies under it: the page does not name this machine's
    folders."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def main(argv: list[str] | None = None) -> Path:
    from monai_adv.hardware import machine_summary
    from monai_adv.reproduce.__main__ import code_version, dataset_citation

    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    start = time.perf_counter()
    spec = load_study(args.study)
    dataset_dir = args.dataset_dir or spec.dataset_dir
    if dataset_dir is None:
        raise SystemExit(f"{spec.source} names no dataset_dir: pass --dataset_dir DIR.")
    output = Path(args.output)
    work_dir = Path(args.work_dir) if args.work_dir else output / "work" / spec.name
    results_file = output / spec.name / "raw_results.json"
    runner = StudyRunner(spec, dataset_dir, args.seeds, work_dir, bundle_dir=args.bundle_dir, arms=args.arms,
                         tracking=not args.no_tracking, max_epochs=args.max_epochs,
                         results_file=results_file, code_version=code_version())  # fmt: skip
    if args.report_only:
        if not results_file.is_file():
            raise SystemExit(f"--report_only: no results yet in {results_file}; run the study first.")
        results = json.loads(results_file.read_text())
        runner.counts = dict(results.get("counts", {}))
    else:
        results = runner.run()
    results, stale = runner.current_results(results)
    if stale:
        logging.getLogger(__name__).warning("left out of the page: %s", "; ".join(stale))
    command = shlex.join(["python", "-m", "monai_adv.study", *(sys.argv[1:] if argv is None else argv)])
    context = {
        "command": command,
        "study_file": _shown_path(spec.source),
        "version": code_version(),
        "machine": machine_summary(),
        "wall_time_s": time.perf_counter() - start,
        "timings": runner.timings,
        "counts": runner.counts,
        "dataset_dir": str(dataset_dir),
        "source": dataset_citation(Path(dataset_dir)),
        "commands": runner.commands,
        "resumed": runner.resumed,
        "stale": stale,
    }
    page = write_study_report(results, spec, output, context)
    print(f"wrote {page}")
    return page


if __name__ == "__main__":
    main()
