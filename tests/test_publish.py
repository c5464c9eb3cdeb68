"""``python -m monai_adv.study.publish``: the bundle's default recipe, eval_metrics and Performance section come from a
study's summary.json (the smoke study in tests/test_study.py publishes a real one end to end)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from monai_adv.errors import SettingsError
from monai_adv.study.publish import BEGIN, END, publish

REPO_ROOT = Path(__file__).resolve().parents[1]
BUNDLE = REPO_ROOT / "bundles" / "adversarial_unet_segmentation"
EPS = [2 / 255, 4 / 255]


def arm_entry(label: str, overrides: dict, clean: float, robust: float, control: str | None, candidate: bool) -> dict:
    """An arm of a summary as :func:`monai_adv.study.report.summarize` writes it (two seeds)."""
    entry = {"label": label, "seeds": [0, 1], "overrides": overrides, "control": control, "candidate": candidate,
             "clean_iou": [clean, clean + 0.02], "clean_dice": [clean + 0.1, clean + 0.12],
             "robust_iou": {f"{e:g}": [robust, robust + 0.02] for e in EPS}, "step_ratio": [2.0, 2.1],
             "code": ["abc123"], "checks_failed": []}  # fmt: skip
    if control:
        interval = {"mean": -0.02, "low": -0.04, "high": 0.0, "seeds": 2, "images": 100}
        entry["vs_control"] = {"clean_iou": interval, **{f"robust_iou@{e:g}": interval for e in EPS}}
    return entry


def summary(default_arm: str = "nfgsm", complete: bool = True) -> dict:
    arms = {
        "unet": arm_entry("UNet", {"adv#method": "none"}, 0.60, 0.04, None, False),
        "nfgsm": arm_entry("N-FGSM", {"adv#recipe": "nfgsm"}, 0.55, 0.30, "unet", True),
        "std_nfgsm": arm_entry("std + N-FGSM", {"adv#recipe": "nfgsm", "augment": "standard"}, 0.57, 0.31, "unet",
                               True),
        "tuned": arm_entry("tuned", {"adv#recipe": "nfgsm", "adv#epsilon": 0.01}, 0.58, 0.2, "unet", True),
    }  # fmt: skip
    return {
        "study": {
            "name": "recipes",
            "title": "Recipes",
            "page": "recipes.md",
            "profile": "cpu",
            "dataset": "kvasir_seg",
            "command": "python -m monai_adv.study kvasir_recipes",
            "version": "abc123",
            "complete": complete,
            "gaps": [] if complete else ["arms with fewer than 3 seeds: `nfgsm`"],
        },
        "summary": {"arms": arms, "epsilons": EPS, "plain_arm": "unet"},
        "default": {
            "arm": default_arm,
            "reason": "the best trade-off",
            "meets_target": False,
            "within_tolerance": False,
        },
    }


@pytest.fixture
def bundle_copy(tmp_path: Path) -> Path:
    target = tmp_path / "bundle"
    (target / "docs").mkdir(parents=True)
    shutil.copytree(BUNDLE / "configs", target / "configs")
    shutil.copy(BUNDLE / "docs" / "README.md", target / "docs")
    return target


def write(tmp_path: Path, content: dict) -> Path:
    path = tmp_path / "summary.json"
    path.write_text(json.dumps(content))
    return path


def test_publish_sets_the_default_and_writes_the_numbers(bundle_copy: Path, tmp_path: Path):
    train_path = bundle_copy / "configs" / "train.json"
    before = json.loads(train_path.read_text())
    assert publish(write(tmp_path, summary("std_nfgsm")), bundle_copy) == {"adv#recipe": "nfgsm",
                                                                           "augment": "standard"}  # fmt: skip
    train = json.loads(train_path.read_text())
    assert (train["adv"]["recipe"], train["augment"]) == ("nfgsm", "standard")
    # nothing else in train.json changed
    assert {k: v for k, v in train.items() if k not in ("adv", "augment")} == {
        k: v for k, v in before.items() if k not in ("adv", "augment")
    }
    assert {k: v for k, v in train["adv"].items() if k != "recipe"} == {
        k: v for k, v in before["adv"].items() if k != "recipe"
    }
    metrics = json.loads((bundle_copy / "configs" / "metadata.json").read_text())["eval_metrics"]
    assert metrics["default_recipe"] == "nfgsm" and metrics["default_arm"] == "std_nfgsm"
    assert metrics["kvasir_seg_test_mean_iou_std_nfgsm"] == pytest.approx(0.58)  # mean of the two seeds
    assert metrics["kvasir_seg_test_ensemble_iou_2_255_unet"] == pytest.approx(0.05)
    assert "kvasir_seg_test_mean_iou_nfgsm" not in metrics  # only the default, its control and the plain arm
    readme = (bundle_copy / "docs" / "README.md").read_text()
    section = readme.split(BEGIN)[1].split(END)[0]
    assert "| std + N-FGSM (`std_nfgsm`) | 2 | 0.580 ± 0.014 | 0.680 ± 0.014 | 0.320 ± 0.014 |" in section
    assert "-2.0 [-4.0, +0.0]" in section and "| 2.05 ± 0.07x |" in section and "(wall)" not in section
    assert "**Default recipe: `nfgsm`** (arm `std_nfgsm`" in section and "not complete" not in section

    # publishing another choice replaces the section and resets what the new default leaves alone
    publish(write(tmp_path, summary("nfgsm")), bundle_copy)
    train = json.loads(train_path.read_text())
    assert (train["adv"]["recipe"], train["augment"]) == ("nfgsm", "none")
    readme = (bundle_copy / "docs" / "README.md").read_text()
    assert readme.count(BEGIN) == 1 and readme.count("## Performance\n") == 1  # (the 3D overlay's has its own)
    assert readme.index(END) < readme.index("## Commands")
    # the bundle still parses with the new default
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(train_path))
    assert parser.get_parsed_content("adv#preset")["recipe"] == "nfgsm"


def test_publish_refuses_and_changes_nothing(bundle_copy: Path, tmp_path: Path):
    files = {p: p.read_bytes() for p in bundle_copy.rglob("*") if p.is_file()}
    with pytest.raises(
        SettingsError, match=r"not complete \(arms with fewer than 3 seeds: `nfgsm`\).*--allow_incomplete"
    ):
        publish(write(tmp_path, summary(complete=False)), bundle_copy)
    with pytest.raises(SettingsError, match=r"'tuned' sets \['adv#epsilon'\].*RECIPES"):
        publish(write(tmp_path, summary("tuned")), bundle_copy)
    readme = bundle_copy / "docs" / "README.md"
    text = readme.read_text()
    broken = text.replace(END, "") if BEGIN in text else text + "\n" + BEGIN + "\n"
    readme.write_text(broken)
    files[readme] = broken.encode()
    with pytest.raises(ValueError, match="no <!-- results:end -->"):
        publish(write(tmp_path, summary()), bundle_copy)
    assert {p: p.read_bytes() for p in bundle_copy.rglob("*") if p.is_file()} == files
    # an incomplete study may be published on request, and says so
    readme.write_text(text)
    publish(write(tmp_path, summary(complete=False)), bundle_copy, allow_incomplete=True)
    assert "**The study is not complete** (arms with fewer than 3 seeds: `nfgsm`)" in readme.read_text()


def test_publish_command_line_names_the_problem(bundle_copy: Path, tmp_path: Path):
    command = [sys.executable, "-m", "monai_adv.study.publish", "--summary", str(write(tmp_path, summary("tuned"))),
               "--bundle", str(bundle_copy)]  # fmt: skip
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode != 0
    assert done.stderr.strip().splitlines()[-1].startswith("python -m monai_adv.study.publish: the chosen arm 'tuned'")


def test_the_bundle_default_is_documented_where_users_read_it():
    """README and the bundle README name the default recipe that configs/train.json holds."""
    recipe = json.loads((BUNDLE / "configs" / "train.json").read_text())["adv"]["recipe"]
    assert f"`--adv#recipe {recipe}` (default)" in (REPO_ROOT / "README.md").read_text()
    readme = (BUNDLE / "docs" / "README.md").read_text()
    assert f"**Default recipe: `{recipe}`**" in readme or recipe == "paper"
    # once a 3D study is published, its overlay's default is named where 3D users read (README's 3D section)
    overlay = json.loads((BUNDLE / "configs" / "hippocampus.json").read_text())
    if "adv#recipe" in overlay:
        section = (REPO_ROOT / "README.md").read_text().split("## 3D volumes")[1].split("\n## ")[0]
        assert f"`{overlay['adv#recipe']}`" in section
        assert f"**Default recipe: `{overlay['adv#recipe']}`** (arm" in readme.split("configs/hippocampus.json")[1]


def test_a_study_of_an_overlay_sets_that_overlay_and_keeps_the_other_studies(bundle_copy: Path, tmp_path: Path):
    """A 3D study (profile hippocampus_cpu) sets configs/hippocampus.json's default, not train.json's."""
    from monai.bundle import ConfigParser

    from monai_adv.study.publish import markers

    configs = bundle_copy / "configs"
    train_before = (configs / "train.json").read_bytes()
    publish(write(tmp_path, summary("nfgsm")), bundle_copy)  # the 2D study first
    train_2d = (configs / "train.json").read_bytes()
    metrics_2d = {
        k: v
        for k, v in json.loads((configs / "metadata.json").read_text())["eval_metrics"].items()
        if not k.startswith("hippocampus_")
    }  # (the bundle may hold a published 3D study already)
    section_2d = (bundle_copy / "docs" / "README.md").read_text().split(BEGIN)[1].split(END)[0]

    three_d = summary("std_nfgsm")
    three_d["study"].update(name="results_3d", title="3D", page="results_3d.md", profile="hippocampus_cpu",
                            dataset="msd_hippocampus", command="python -m monai_adv.study hippocampus_recipes")  # fmt: skip
    assert publish(write(tmp_path, three_d), bundle_copy) == {"adv#recipe": "nfgsm", "augment": "standard"}
    overlay = json.loads((configs / "hippocampus.json").read_text())
    assert (overlay["adv#recipe"], overlay["augment"], overlay["spatial_dims"]) == ("nfgsm", "standard", 3)
    assert (configs / "train.json").read_bytes() == train_2d != train_before  # the 2D default stays the 2D study's
    metrics = json.loads((configs / "metadata.json").read_text())["eval_metrics"]
    assert {k: metrics[k] for k in metrics_2d} == metrics_2d  # the 2D study's keys are kept as they were
    assert metrics["hippocampus_default_recipe"] == "nfgsm" and metrics["hippocampus_default_arm"] == "std_nfgsm"
    assert metrics["hippocampus_test_mean_iou_std_nfgsm"] == pytest.approx(0.58)
    assert "hippocampus_recipes" in metrics["hippocampus_source"] and "kvasir" in metrics["source"]
    readme = (bundle_copy / "docs" / "README.md").read_text()
    begin, end = markers("hippocampus.json")
    assert readme.split(BEGIN)[1].split(END)[0] == section_2d
    section_3d = readme.split(begin)[1].split(end)[0]
    assert "## Performance with configs/hippocampus.json" in section_3d and "docs/results_3d.md" in section_3d
    assert "**Default recipe: `nfgsm`** (arm `std_nfgsm`, `adv#recipe` in `configs/hippocampus.json`)" in section_3d
    assert readme.index(END) < readme.index(begin) < readme.index(end) < readme.index("## Commands")

    # the merged configs train the 3D default; train.json alone still trains the 2D one
    parser = ConfigParser()
    parser.read_config([str(configs / "train.json"), str(configs / "hippocampus.json")])
    assert parser.get_parsed_content("adv#preset")["recipe"] == "nfgsm" and parser["augment"] == "standard"
    parser = ConfigParser()
    parser.read_config(str(configs / "train.json"))
    assert parser["augment"] == "none"

    # publishing a 2D study again leaves the 3D one in place and replaces every other key (another dataset's
    # study leaves nothing of the previous one), and the other way round
    other_data = summary("nfgsm")
    other_data["study"]["dataset"] = "other_polyps"
    publish(write(tmp_path, other_data), bundle_copy)
    metrics = json.loads((configs / "metadata.json").read_text())["eval_metrics"]
    assert metrics["hippocampus_default_arm"] == "std_nfgsm" and metrics["default_arm"] == "nfgsm"
    assert not [k for k in metrics if k.startswith("kvasir_seg_")] and "other_polyps_test_mean_iou_nfgsm" in metrics
    assert json.loads((configs / "hippocampus.json").read_text())["adv#recipe"] == "nfgsm"
    three_d["default"]["arm"] = "nfgsm"
    publish(write(tmp_path, three_d), bundle_copy)
    assert json.loads((configs / "hippocampus.json").read_text())["augment"] == "none"
    readme = (bundle_copy / "docs" / "README.md").read_text()
    assert (
        readme.count(begin) == 1
        and readme.count(BEGIN) == 1
        and "(arm `nfgsm`, `adv#recipe` in `configs/hippo" in readme
    )
