"""The 3D, 3-class path on real MRI volumes (MSD Task04 Hippocampus): train, evaluate, robustness, augment."""

from __future__ import annotations

import csv
import json

import pytest

from monai_adv.data import load_datalist

pytestmark = pytest.mark.slow

TINY_3D = {"adv#recipe": "paper", "max_train": 4, "max_val": 2, "max_epochs": 2, "val_interval": 1, "batch_size": 2,
           "features": [8, 8, 16, 16, 32, 8], "patches_per_volume": 1}  # fmt: skip


@pytest.fixture(scope="module")
def hippocampus(bundle):
    data = bundle.shared_dir / "data" / "msd_hippocampus"
    if not (data / "dataset.json").is_file():
        pytest.skip(f"{data} is absent: the 3D tests need the MSD hippocampus volumes (../shared/data)")
    return data


def _configs(bundle, *overlays: str) -> str:
    files = [bundle.train_json, bundle.configs / "hippocampus.json", *(bundle.configs / o for o in overlays)]
    return "[" + ",".join(f"'{f}'" for f in files) + "]"


@pytest.fixture(scope="module")
def trained_3d(bundle, hippocampus, tmp_path_factory):
    root = tmp_path_factory.mktemp("hippocampus")
    settings = {"dataset_dir": hippocampus, **TINY_3D, "adv#method": "fgsm", "adv#epsilon": 0.05}
    run = bundle.run("run", "training", "--config_file", _configs(bundle), "--bundle_root", root, "--tracking", "mlflow",
                     *bundle.overrides(settings), root=root)  # fmt: skip
    return root, run


def test_decathlon_folder_gives_the_fixed_split(hippocampus):
    data = load_datalist(dataset_dir=hippocampus, spatial_dims=3, in_channels=1, check_files=False)
    split = json.loads((hippocampus / "split.json").read_text())
    assert [i["id"] for i in data["training"]] == split["train"]
    assert [i["id"] for i in data["test"]] == split["test"]


def test_training_logs_per_class_scores_named_from_dataset_json(bundle, trained_3d):
    root, run = trained_3d
    assert (root / "models" / "model.pt").is_file(), run.describe()
    assert "val_iou_anterior" in run.output and "val_dice_posterior" in run.output
    _client, mlflow_run = bundle.single_mlflow_run(bundle.sqlite_uri(root))
    keys = set(mlflow_run.data.metrics)
    assert {"val_mean_iou", "val_iou_anterior", "val_iou_posterior", "val_dice_anterior", "val_dice_posterior"} <= keys
    history = json.loads((root / "models" / "training_history.json").read_text())
    # 4 volumes, one 32^3 patch each, with an FGSM copy appended: 8 samples per epoch in 2 steps
    assert [(e["iterations"], e["images"]) for e in history["epochs"]] == [(2, 8), (2, 8)]


def test_evaluate_and_robustness_score_each_class_through_the_sliding_window(bundle, hippocampus, trained_3d):
    root, _ = trained_3d
    common = bundle.overrides({"dataset_dir": hippocampus, **TINY_3D})
    bundle.run("run", "evaluating", "--config_file", _configs(bundle, "evaluate.json"), "--bundle_root", root, *common)
    with open(root / "eval" / "metrics.csv") as stream:
        metrics = dict(line.split(",")[:2] for line in stream.read().splitlines() if "," in line)
    assert {"val_iou_anterior", "val_iou_posterior", "val_mean_iou"} <= set(metrics)
    out = root / "robust"
    robust = bundle.run(
        "run", "robustness", "--config_file", _configs(bundle, "robustness.json"), "--bundle_root", root, *common,
        "--output_dir", out, "--attacks", "['fgsm','pgd','ensemble']", "--epsilons", "[0,0.0078]",
        "--num_steps", 2, "--checks", "false", "--num_examples", 0,
    )  # fmt: skip
    summary = json.loads((out / "robustness.json").read_text())
    clean = next(r for r in summary["results"] if r["attack"] == "pgd" and r["epsilon"] == 0)
    # the clean row is run evaluating's score (same sliding-window inference, same postprocessing)
    assert clean["mean_iou"] == pytest.approx(float(metrics["val_mean_iou"]), abs=1e-5), robust.describe()
    assert {"iou_anterior", "iou_posterior", "dice_anterior"} <= set(clean)
    with open(out / "robustness_per_image.csv") as stream:
        names = {line["image"] for line in csv.DictReader(stream)}
    split = json.loads((hippocampus / "split.json").read_text())
    assert names == set(split["validation"][:2])  # each volume named by its case id


def test_augment_writes_z_scored_copies_that_reload_within_epsilon_and_train(bundle, hippocampus, trained_3d):
    import torch
    from monai.transforms import Compose

    from monai_adv.data import volume_preprocessing

    root, _ = trained_3d
    epsilon = 0.05
    settings = bundle.overrides({"dataset_dir": hippocampus, **{k: v for k, v in TINY_3D.items() if k != "max_epochs"}})
    bundle.run("run", "augment", "--config_file", _configs(bundle, "augment.json"), "--bundle_root", root, *settings,
               "--adv#epsilon", epsilon)  # fmt: skip
    datalist = json.loads((root / "data" / "adversarial" / "datalist_fgsm.json").read_text())
    originals, copies = datalist["training"][:4], datalist["training"][4:]
    assert len(copies) == 4 and all(c["normalized"] is True for c in copies)
    load = Compose(volume_preprocessing(["image", "label"], out_channels=3, spatial_size=(48, 64, 48)))
    for original, copy in zip(originals, copies):
        clean, adversarial = load(original), load(copy)
        difference = (adversarial["image"] - clean["image"]).abs()
        assert float(difference.max()) <= epsilon + 1e-5 and float(difference.max()) > epsilon / 2
        assert torch.allclose(adversarial["image"].affine, clean["image"].affine)  # the same place in the world
        assert torch.equal(adversarial["label"].as_tensor(), clean["label"].as_tensor())
    # the doubled datalist trains (originals and flagged copies in one batch)
    trained = bundle.run("run", "training", "--config_file", _configs(bundle), "--bundle_root", root / "doubled",
                         *bundle.overrides({**TINY_3D, "max_epochs": 1, "adv#method": "none"}),
                         "--datalist_file", root / "data" / "adversarial" / "datalist_fgsm.json")  # fmt: skip
    assert (root / "doubled" / "models" / "model.pt").is_file(), trained.describe()


def test_inference_writes_nifti_predictions_on_the_inputs_grid(bundle, hippocampus, trained_3d, tmp_path):
    import shutil

    import nibabel as nib
    import numpy as np

    root, _ = trained_3d
    volumes = tmp_path / "volumes"
    volumes.mkdir()
    for case in ("hippocampus_001", "hippocampus_004"):
        shutil.copy(hippocampus / "imagesTr" / f"{case}.nii.gz", volumes)
    configs = f"['{bundle.configs / 'inference.json'}','{bundle.configs / 'hippocampus_inference.json'}']"
    out = tmp_path / "predictions"
    bundle.run("run", "inferring", "--config_file", configs, "--bundle_root", root, "--input_dir", volumes,
               "--output_dir", out, "--features", "[8,8,16,16,32,8]")  # fmt: skip
    for case in ("hippocampus_001", "hippocampus_004"):
        source, predicted = nib.load(volumes / f"{case}.nii.gz"), nib.load(out / f"{case}_seg.nii.gz")
        assert predicted.shape == source.shape and np.allclose(predicted.affine, source.affine)
        assert set(np.unique(np.asarray(predicted.dataobj))) <= {0, 1, 2}


def test_validation_batches_two_volumes_also_when_one_is_larger_than_the_padding(bundle, hippocampus, tmp_path):
    """The overlay validates two volumes a batch; ``pad_list_data_collate`` pads a batch of unequal volumes (here a
    padding smaller than the volumes, so each keeps its own shape) instead of failing to stack them."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(bundle.train_json), str(bundle.configs / "hippocampus.json")])
    parser.update({"bundle_root": str(tmp_path), "dataset_dir": str(hippocampus), "max_val": 2,
                   "spatial_size": [16, 16, 16]})  # fmt: skip
    items = parser.get_parsed_content("validate#dataset").data
    shapes = [tuple(parser.get_parsed_content("validate#preprocessing")(i)["image"].shape) for i in items]
    assert len(set(shapes)) == 2, shapes  # the two volumes differ: a plain collate could not stack them
    batch = next(iter(parser.get_parsed_content("validate#dataloader")))
    largest = tuple(max(s[d] for s in shapes) for d in range(4))
    assert batch["image"].shape == (2, *largest) and batch["label"].shape == (2, 1, *largest[1:])
