"""``run augment``: the paper's offline protocol (train -> write adversarial copies -> retrain on the doubled data)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch


def augment_configs(bundle) -> str:
    return f"['{bundle.train_json}','{bundle.configs / 'augment.json'}']"


def bundle_preprocessing(bundle, root: Path):
    """The bundle's own preprocessing (LoadImaged, binarise, fixed [0, 255] scaling, resize), in process, without
    the training's random augmentation (the shipped default may be --augment standard)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(bundle.train_json))
    parser.update({"bundle_root": str(root), "image_size": bundle.tiny_image_size, "augment": "none"})
    return parser.get_parsed_content("train#preprocessing")


def test_augment_writes_one_copy_per_item_within_epsilon_and_the_doubled_datalist_trains(
    bundle, trained_bundle, tmp_path, one_torch_thread
):
    root = bundle.copy_outputs(trained_bundle.root, tmp_path / "bundle")
    settings = {k: v for k, v in bundle.tiny.items() if k != "max_epochs"}
    epsilon = 0.05
    bundle.run(
        "run", "augment", "--config_file", augment_configs(bundle), "--bundle_root", root,
        "--adv#method", "both", "--adv#epsilon", epsilon, *bundle.overrides(settings),
    )  # fmt: skip
    out = root / "data" / "adversarial"
    combined = json.loads((out / "datalist.json").read_text())
    per_method = {m: json.loads((out / f"datalist_{m}.json").read_text()) for m in ("fgsm", "invfgsm")}
    originals = combined["training"][:16]
    assert len(combined["training"]) == 16 * 3
    assert all(len(d["training"]) == 32 and d["training"][:16] == originals for d in per_method.values())
    # validation untouched: the same items the bundle validates on
    assert combined["validation"] == per_method["fgsm"]["validation"] and len(combined["validation"]) == 8
    assert all(not Path(item["image"]).parent.samefile(out / "images") for item in combined["validation"])
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(
        f"{item['id']}_{m}.png" for item in originals for m in ("fgsm", "invfgsm")
    )
    assert len(list((out / "masks").iterdir())) == 32

    preprocess = bundle_preprocessing(bundle, root)
    largest = 0.0
    for method, datalist in per_method.items():
        for original, copy in zip(originals, datalist["training"][16:]):
            assert copy["id"] == f"{original['id']}_{method}"
            clean, adversarial = preprocess(dict(original)), preprocess(dict(copy))
            assert adversarial["image"].shape == clean["image"].shape == (3, 32, 32)
            difference = (torch.as_tensor(adversarial["image"]) - torch.as_tensor(clean["image"])).abs().max().item()
            assert difference <= epsilon + 1 / 255 + 1e-6, (copy["image"], difference)
            largest = max(largest, difference)
            assert torch.equal(torch.as_tensor(adversarial["label"]), torch.as_tensor(clean["label"]))
    # the perturbation survives the file format: not rounded or rescaled away
    assert largest >= epsilon - 1 / 255

    retrain = bundle.train(
        root, {"adv#method": "none", "max_train": None, "datalist_file": out / "datalist_fgsm.json",
               "ckpt_dir": root / "retrained", "max_epochs": 1},
    )  # fmt: skip
    assert "Epoch[1] Complete" in retrain.output
    assert (root / "retrained" / "model.pt").is_file()


def test_augment_refuses_per_image_scaling_and_unknown_methods(bundle, trained_bundle, tmp_path, restore_determinism):
    from monai.bundle import ConfigWorkflow

    root = bundle.copy_outputs(trained_bundle.root, tmp_path / "bundle")
    for override, message in (({"intensity_range": None}, "fixed intensity scaling"), ({"adv#method": "pgd"}, "pgd")):
        workflow = ConfigWorkflow(
            config_file=[str(bundle.train_json), str(bundle.configs / "augment.json")], workflow_type=None,
            logging_file=False, bundle_root=str(root), **bundle.tiny_net, max_train=4, max_val=2, **override,
        )  # fmt: skip
        workflow.initialize()
        with pytest.raises(Exception) as info:
            workflow.run()
        assert message in f"{info.value} {info.value.__cause__}"
    assert not (root / "data" / "adversarial").exists()


LOCK_HOLDER = """
import sys, time
from monai_adv.bundle import FolderLock
FolderLock(sys.argv[1], "augment.lock", "augmentation", info={"checkpoint": "the other run"}).acquire()
print("HELD", flush=True)
time.sleep(120)
"""


def test_a_second_augment_into_the_same_folder_is_refused(bundle, trained_bundle, tmp_path, restore_determinism):
    import subprocess
    import sys

    from monai.bundle import ConfigWorkflow

    from monai_adv.errors import LockError

    root = bundle.copy_outputs(trained_bundle.root, tmp_path / "bundle")
    out = root / "data" / "adversarial"
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "HELD"
        workflow = ConfigWorkflow(
            config_file=[str(bundle.train_json), str(bundle.configs / "augment.json")], workflow_type=None,
            logging_file=False, bundle_root=str(root), **bundle.tiny_net, max_train=4, max_val=2,
        )  # fmt: skip
        workflow.initialize()
        with pytest.raises(Exception) as info:
            workflow.run()
        error = info.value if isinstance(info.value, LockError) else info.value.__cause__
        assert isinstance(error, LockError), info.value
        assert f"another augmentation is running in {out} (pid {holder.pid}" in str(error)
        assert "checkpoint the other run" in str(error) and "--augment_dir" in str(error)
    finally:
        holder.kill()
        holder.wait()
    assert sorted(p.name for p in out.iterdir()) == ["augment.lock"]  # nothing written beside the other run's lock
