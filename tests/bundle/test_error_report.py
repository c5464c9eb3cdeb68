"""A failed bundle command ends with ``monai-adv: error: <root cause>`` for monai-adv's own errors, and only then."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from monai_adv.bundle.error_report import PREFIX, project_error, summary_line
from monai_adv.errors import DataError, MonaiAdvError


def test_project_error_finds_the_root_cause_under_monais_wrapper():
    try:
        try:
            raise DataError("mask m.png is 8x8 but its image i.png is 9x9:\n  masks must have their image's size.")
        except DataError as inner:
            raise RuntimeError("Failed to evaluate ConfigExpression: ...") from inner
    except RuntimeError as outer:
        found = project_error(outer)
    assert isinstance(found, MonaiAdvError)
    assert (
        summary_line(found)
        == PREFIX + "mask m.png is 8x8 but its image i.png is 9x9: masks must have their image's size."
    )


def test_project_error_ignores_other_errors():
    try:
        try:
            _ = 1 / 0
        except ZeroDivisionError as inner:
            raise RuntimeError("Failed to evaluate ConfigExpression: ...") from inner
    except RuntimeError as outer:
        assert project_error(outer) is None


def last_line(run) -> str:
    return run.output.strip().splitlines()[-1]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("workflow", "overlay", "what"),
    [
        ("evaluating", "evaluate.json", "checkpoint to evaluate"),
        ("robustness", "robustness.json", "checkpoint to evaluate"),
        ("augment", "augment.json", "checkpoint to attack"),
        ("inferring", None, "checkpoint for inference"),
    ],
)
def test_missing_checkpoint_ends_with_one_line_in_every_workflow(bundle, tmp_path, workflow, overlay, what):
    configs = f"['{bundle.train_json}','{bundle.configs / overlay}']" if overlay else bundle.inference_json
    run = bundle.run("run", workflow, "--config_file", configs, "--bundle_root", tmp_path, expect_success=False)
    assert run.returncode != 0
    assert last_line(run) == f"{PREFIX}{what} (ckpt_path) {tmp_path}/models/model.pt does not exist.", run.describe()
    assert "Traceback" in run.output  # the traceback stays above it


@pytest.mark.slow
def test_bad_data_file_ends_with_one_line_naming_it(bundle, tmp_path):
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "masks").mkdir()
    for index in range(4):
        mode = "RGBA" if index == 2 else "RGB"
        Image.new(mode, (16, 16)).save(data / "images" / f"{index}.png")
        Image.fromarray(np.full((16, 16), 255 * (index % 2), np.uint8)).save(data / "masks" / f"{index}.png")
    run = bundle.train(tmp_path / "root", {"dataset_dir": data, "adv#method": "none"}, expect_success=False)
    assert last_line(run).startswith(
        f"{PREFIX}1 problem(s) in the files of {data}: {data}/images/2.png has 4 channel(s)"
    )
    assert "mode RGBA" in last_line(run), run.describe()


@pytest.mark.slow
def test_unexpected_errors_keep_their_traceback_and_get_no_line(bundle, tmp_path):
    run = bundle.train(tmp_path, {"adv#method": "none", "max_epochs": "$1 // 0"}, expect_success=False)
    assert run.returncode != 0
    assert PREFIX not in run.output, run.describe()
    assert "ZeroDivisionError" in run.output
    assert "RuntimeError: Failed to evaluate ConfigExpression" in run.output


@pytest.mark.slow
def test_a_bundle_root_that_cannot_hold_models_ends_with_one_line(bundle, tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (root / "models").write_text("not a folder")  # what a read-only or full disk also gives: no training files
    run = bundle.train(root, {"adv#method": "none"}, expect_success=False)
    assert last_line(run).startswith(f"{PREFIX}cannot write the training's files in {root}/models: "), run.describe()
    assert "Give a --bundle_root that is a writable folder with free space." in last_line(run)
