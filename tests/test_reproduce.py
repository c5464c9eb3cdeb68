"""``python -m monai_adv.reproduce --profile smoke``: end to end, and the page reports what the run measured."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
KVASIR = REPO_ROOT.parent / "shared" / "data" / "kvasir_seg"


def table_rows(page: str, heading: str) -> dict[str, list[str]]:
    """``{first cell: other cells}`` of the first markdown table after ``heading``."""
    section = page.split(heading, 1)[1]
    rows = {}
    for line in section.splitlines()[2:]:
        if not line.startswith("|"):
            if rows:
                break
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        if not set(cells[0]) <= {"-"} and cells[0] != "arm":
            rows[cells[0]] = cells[1:]
    return rows


# the smoke profile's limits: 16 training, 8 validation and 8 test images
SMOKE_TEST_IMAGES, SMOKE_TRAIN_IMAGES = 8, 16


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """A small subset is taken by the smoke profile; Kvasir-SEG when present, else a generated dataset.

    Without a split.json with a test list, the reproduction splits 80/10/10: 80 generated images give the smoke
    profile its full 8 test and 16 training images, as Kvasir-SEG does.
    """
    if (KVASIR / "split.json").is_file():
        return KVASIR
    from monai_adv.data.synthetic import make_synthetic_dataset

    return make_synthetic_dataset(tmp_path_factory.mktemp("data") / "synthetic", num_images=80, size=48)


def assert_tables_are_well_formed(page: str) -> None:
    """Every Markdown table on the page has as many cells in each row (and its |---| line) as in its header."""
    tables, current = [], []
    for line in page.splitlines() + [""]:
        if line.startswith("|"):
            current.append(line)
        elif current:
            tables.append(current)
            current = []
    assert tables
    for table in tables:
        widths = [len(row.strip().strip("|").split("|")) for row in table]
        assert len(set(widths)) == 1, table
        assert set(table[1].replace("|", "").replace("-", "").replace(":", "").strip()) == set(), table


def test_the_generated_fallback_dataset_fills_the_smoke_profile(tmp_path):
    """On a plain clone (no Kvasir-SEG) the smoke test below runs on the generated dataset: it must give the smoke
    profile the same numbers of images as Kvasir-SEG does, which its assertions count on."""
    from monai_adv.data.synthetic import make_synthetic_dataset
    from monai_adv.reproduce import PROFILES, Reproduction

    data = make_synthetic_dataset(tmp_path / "synthetic", num_images=80, size=48)
    parts = Reproduction(data, PROFILES["smoke"], seeds=[0], work_dir=tmp_path / "work").split()
    assert (len(parts["train"]), len(parts["validation"]), len(parts["test"])) == (
        SMOKE_TRAIN_IMAGES,
        8,
        SMOKE_TEST_IMAGES,
    )


def test_smoke_reproduction_reports_what_it_measured(dataset, tmp_path):
    output = tmp_path / "out"
    command = [sys.executable, "-m", "monai_adv.reproduce", "--dataset_dir", str(dataset), "--profile", "smoke",
               "--seeds", "0", "--output", str(output)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    result = subprocess.run(command, check=False, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-6000:]
    page = (output / "results.md").read_text()
    for figure in ("val_iou_by_epoch.png", "robustness_by_arm.png", "examples.png"):
        assert (output / "results" / figure).stat().st_size > 0
        assert f"results/{figure}" in page
    assert "--profile smoke" in page and "Code version: `" in page and "Wall time:" in page
    assert_tables_are_well_formed(page)
    budget = json.loads((output / "work" / "runs" / "seed0" / "unet" / "robustness_default" / "done.json").read_text())
    assert f"**{budget['seconds'] / 60:.1f} min** on this machine" in page  # the default budget, as measured

    from mlflow.tracking import MlflowClient
    from monai.utils import path_to_sqlite_uri

    labels = {
        "unet": "UNet",
        "fgsm_online": "UNet + FGSM (online)",
        "invfgsm_offline": "UNet + InvFGSM (offline, Fig. 1)",
    }
    test_rows = table_rows(page, "## Test split, best checkpoint")
    val_rows = table_rows(page, "## Validation IoU at the paper's epochs")
    robust_rows = {}
    for line in page.split("## Robustness on the test split", 1)[1].splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) > 3 and cells[1] in ("FGSM", "InvFGSM", "PGD"):
            robust_rows[cells[0], cells[1]] = cells[2:]
    ensemble_rows = table_rows(page, "## Robust IoU you can quote")
    for arm, label in labels.items():
        root = output / "work" / "runs" / "seed0" / arm
        # the test score is the clean row of this arm's robustness.json on the test split
        measured = json.loads((root / "robustness_test" / "robustness.json").read_text())
        assert measured["num_images"] == 8
        rows = {(r["attack"], r["epsilon"]): r for r in measured["results"]}
        assert test_rows[label][0] == f"{rows['fgsm', 0.0]['mean_iou']:.4f}"
        assert test_rows[label][1] == f"{rows['fgsm', 0.0]['mean_dice']:.4f}"
        assert robust_rows[label, "FGSM"][-1] == f"{rows['fgsm', 0.1176]['mean_iou']:.4f}"
        # the iterative attacks ran at 2/255 and 4/255 only (iterative_epsilons): no PGD cell at 0.1176
        assert robust_rows[label, "PGD"][-1] == "–" and ("pgd", 0.1176) not in rows
        # the quoted robust IoU: PGD and the per-image worst case at 2/255 and 4/255, from the same file
        quoted = ensemble_rows[label]
        for column, (attack, eps) in enumerate([("pgd", 2 / 255), ("ensemble", 2 / 255), ("pgd", 4 / 255),
                                                 ("ensemble", 4 / 255)], start=1):  # fmt: skip
            assert quoted[column] == f"{rows[attack, eps]['mean_iou']:.4f}"
        assert rows["ensemble", 4 / 255]["mean_iou"] <= rows["pgd", 4 / 255]["mean_iou"] + 1e-7
        assert set(measured["checks"]) >= {"large_radius", "noise_weaker", "fgsm_not_stronger"}
        # the validation IoU at the last epoch is what training logged to its MLflow store
        client = MlflowClient(path_to_sqlite_uri(str(root / "eval" / "mlruns.db")))
        history = {
            m.step: m.value
            for e in client.search_experiments()
            for r in client.search_runs([e.experiment_id])
            for m in client.get_metric_history(r.info.run_id, "val_mean_iou")
        }
        assert sorted(history) == [1, 2, 3]
        assert val_rows[label][-1] == f"{history[3]:.4f}"
    # one adversarial copy per training item for each offline method, from the UNet arm's checkpoint
    offline_data = output / "work" / "runs" / "seed0" / "invfgsm_offline" / "offline_data"
    offline = json.loads((offline_data / "datalist_invfgsm.json").read_text())
    assert len(offline["training"]) == 32 and offline["checkpoint"].endswith(
        str(Path("seed0", "unet", "models", "model.pt"))
    )
    assert re.search(r"\*\*(held|did not hold|unclear)", page)
    summary = json.loads((output / "results" / "summary.json").read_text())
    assert f"{summary['arms']['unet']['test_mean_iou']['mean']:.4f}" == test_rows["UNet"][0]

    # run again on the same work_dir: every step had completed with the same settings, so none runs again and
    # the page reports the same numbers
    trained = {p: p.stat().st_mtime_ns for p in (output / "work" / "runs").rglob("model.pt")}
    again = subprocess.run(command, check=False, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-6000:]
    assert "skipping a step that already ran" in again.stderr + again.stdout
    assert {p: p.stat().st_mtime_ns for p in (output / "work" / "runs").rglob("model.pt")} == trained
    second = (output / "results.md").read_text()
    assert "- Resumed: " in second
    assert table_rows(second, "## Test split, best checkpoint") == test_rows


def test_code_version_is_dirty_for_changed_code_but_not_for_regenerated_docs(tmp_path):
    """A page regenerated over its committed version leaves the code clean; a changed source file does not."""
    from monai_adv.reproduce.__main__ import code_version

    def git(*args: str) -> None:
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                       capture_output=True)  # fmt: skip

    assert code_version(tmp_path).startswith("unknown")
    (tmp_path / "docs").mkdir()
    (tmp_path / "pkg").mkdir()
    (tmp_path / "docs" / "results.md").write_text("old page\n")
    (tmp_path / "pkg" / "code.py").write_text("x = 1\n")
    git("init", "-q")
    git("add", ".")
    git("commit", "-qm", "first")
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True, check=True)
    commit = commit.stdout.strip()
    assert code_version(tmp_path) == f"{commit[:7]} (commit {commit})"
    (tmp_path / "docs" / "results.md").write_text("regenerated page\n")
    (tmp_path / "pkg" / "notes.txt").write_text("untracked\n")
    assert code_version(tmp_path) == f"{commit[:7]} (commit {commit})"
    (tmp_path / "pkg" / "code.py").write_text("x = 2\n")
    assert code_version(tmp_path) == f"{commit[:7]}-dirty (commit {commit})"
    # seen from any folder of the checkout (an install whose files sit below the top)
    assert code_version(tmp_path / "docs") == f"{commit[:7]}-dirty (commit {commit})"
