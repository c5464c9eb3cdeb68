"""The bundle end to end, as users run it: ``python -m monai.bundle run training|evaluating|inferring``."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

# --adv#method -> the adv_method parameter the MLflow run carries
METHOD_PARAM = {"none": "none", "fgsm": "fgsm", "invfgsm": "invfgsm", "both": "fgsm+invfgsm"}
METHOD_LOSSES = {"none": set(), "fgsm": {"adv_loss_fgsm"}, "invfgsm": {"adv_loss_invfgsm"},
                 "both": {"adv_loss_fgsm", "adv_loss_invfgsm"}}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("method", ["none", "fgsm", "invfgsm", "both"])
def test_training_with_each_method_is_tracked_in_mlflow(bundle, method, request, tmp_path):
    if method == "fgsm":  # the very same command trains the shared bundle: reuse it
        run = request.getfixturevalue("trained_bundle")
    else:
        run = bundle.train(tmp_path / "bundle", {"adv#method": method, "adv#track_loss": "true"}, tracking="mlflow")
    root = run.root
    models = root / "models"
    assert (models / "model.pt").is_file(), run.describe()
    assert (models / "checkpoint_epoch=2.pt").is_file(), sorted(p.name for p in models.iterdir())
    bundle.load_tiny_network(models / "model.pt")  # the best model holds weights of the configured network
    checkpoint = torch.load(models / "checkpoint_epoch=2.pt", map_location="cpu", weights_only=False)
    assert {"model", "optimizer", "trainer"} <= set(checkpoint)
    assert checkpoint["trainer"]["iteration"] == 4 and checkpoint["trainer"]["epoch_length"] == 2

    client, mlflow_run = bundle.single_mlflow_run(bundle.sqlite_uri(root))
    assert mlflow_run.info.status == "FINISHED"
    params = mlflow_run.data.params
    assert params["adv_method"] == METHOD_PARAM[method]
    run_id = mlflow_run.info.run_id
    iou = bundle.metric_steps(client, run_id, "val_mean_iou")
    assert [step for step, _ in iou] == [1, 2], iou
    assert all(0.0 <= value <= 1.0 for _, value in iou)
    assert [step for step, _ in bundle.metric_steps(client, run_id, "val_mean_dice")] == [1, 2]
    metrics = set(mlflow_run.data.metrics)
    assert {m for m in metrics if m.startswith("adv_loss_") and m != "adv_loss_clean"} == METHOD_LOSSES[method]
    if method == "none":
        assert not {k for k in params if k != "adv_method" and k.startswith("adv_")}, params
        assert "adv_samples" not in metrics
    else:
        assert float(params["adv_epsilon"]) == pytest.approx(0.1)
        assert params["adv_mode"] == "append" and params["adv_start_epoch"] == "1"
        for name in METHOD_LOSSES[method] | {"adv_loss_clean", "adv_epsilon"}:
            assert [step for step, _ in bundle.metric_steps(client, run_id, name)] == [1, 2], name
        # batches of 8, one copy of each per transform
        samples = bundle.metric_steps(client, run_id, "adv_samples")
        assert [value for _, value in samples] == [8.0 * len(METHOD_LOSSES[method])] * 2
        if method == "fgsm":
            (fgsm_loss, clean_loss) = (mlflow_run.data.metrics[k] for k in ("adv_loss_fgsm", "adv_loss_clean"))
            assert fgsm_loss > clean_loss, "FGSM copies should have a higher loss than the clean batch"

    artifacts = [a.path for a in client.list_artifacts(run_id)]
    configs = [p for p in artifacts if re.fullmatch(r"config_.*\.json", p)]
    assert configs, artifacts
    resolved = json.loads(Path(client.download_artifacts(run_id, configs[0], str(tmp_path))).read_text())
    assert resolved["adv"]["method"] == method and resolved["max_epochs"] == 2
    assert "Epoch[2] Metrics" in run.output


def test_mlflow_epoch_loss_history_is_one_value_per_epoch(bundle, trained_bundle):
    """The per-epoch mean loss has its own name; MONAI's tracking logs per-iteration losses as train_loss."""
    client, mlflow_run = bundle.single_mlflow_run(bundle.sqlite_uri(trained_bundle.root))
    epoch_steps = [step for step, _ in bundle.metric_steps(client, mlflow_run.info.run_id, "train_epoch_loss")]
    assert epoch_steps == [1, 2]
    iteration_steps = [step for step, _ in bundle.metric_steps(client, mlflow_run.info.run_id, "train_loss")]
    assert len(iteration_steps) > 2 and iteration_steps == sorted(iteration_steps)


@pytest.mark.slow
def test_unknown_adversarial_method_is_explained(bundle, tmp_path):
    run = bundle.train(tmp_path / "bundle", {"adv#method": "bogus", "max_epochs": 1}, expect_success=False)
    assert run.returncode != 0
    # checked at start (check_settings), before MONAI's look_up_option in adv#transforms would see it
    last = run.output.strip().splitlines()[-1]
    assert (
        last
        == "monai-adv: error: --adv#method must be one of none, fgsm, invfgsm, both; got 'bogus'. Did you mean 'both'?"
    ), run.describe()
    assert not (tmp_path / "bundle" / "models").exists(), "nothing should be trained"


def error_chain(error: BaseException | None) -> list[BaseException]:
    chain = []
    while error is not None and error not in chain:
        chain.append(error)
        error = error.__cause__ or error.__context__
    return chain


def parse_train_config(bundle, tmp_path, **changes):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(bundle.train_json))
    parser["bundle_root"] = str(tmp_path)
    for key, value in changes.items():
        parser[key.replace("__", "#")] = value
    return parser


def test_unknown_method_message_names_the_key_as_typed(bundle, tmp_path):
    parser = parse_train_config(bundle, tmp_path, adv__method="bogus")
    with pytest.raises(Exception) as info:
        parser.get_parsed_content("adv#transforms")
    messages = [str(e) for e in error_chain(info.value)]
    assert any("'bogus' is not a valid value" in m and "'fgsm'" in m and "'invfgsm'" in m for m in messages), messages
    assert any("adv::method" in m for m in messages), messages


def test_resume_without_checkpoint_is_explained(bundle, tmp_path):
    parser = parse_train_config(bundle, tmp_path, resume="true")
    with pytest.raises(Exception) as info:
        parser.get_parsed_content("resume_from")
    chain = error_chain(info.value)
    assert any(isinstance(e, FileNotFoundError) and "nothing to resume from" in str(e) for e in chain), chain
    assert parse_train_config(bundle, tmp_path, resume="false").get_parsed_content("resume_from") is None
    with pytest.raises(Exception) as info:
        parse_train_config(bundle, tmp_path, resume="maybe").get_parsed_content("resume_from")
    assert any("resume must be true or false, got 'maybe'" in str(e) for e in error_chain(info.value))


@pytest.mark.slow
def test_resume_true_continues_from_the_latest_checkpoint(bundle, trained_bundle, tmp_path):
    root = bundle.copy_outputs(trained_bundle.root, tmp_path / "bundle")
    run = bundle.train(root, {"adv#method": "fgsm", "max_epochs": 3, "resume": "true"})
    restored = [line for line in run.output.splitlines() if "Restored" in line]
    assert restored and "checkpoint_epoch=2.pt" in restored[0], run.describe()
    assert "Epoch: 3/3" in run.output and "Epoch[3] Metrics" in run.output
    assert "Epoch: 1/3" not in run.output and "Epoch: 2/3" not in run.output, "epochs 1-2 must not run again"
    checkpoint = torch.load(root / "models" / "checkpoint_epoch=3.pt", map_location="cpu", weights_only=False)
    assert checkpoint["trainer"]["iteration"] == 6 and checkpoint["trainer"]["max_epochs"] == 3


@pytest.mark.slow
def test_resume_false_starts_afresh(bundle, trained_bundle, tmp_path):
    root = bundle.copy_outputs(trained_bundle.root, tmp_path / "bundle")
    run = bundle.train(root, {"adv#method": "fgsm", "max_epochs": 1, "resume": "false"})
    assert "Restored" not in run.output
    assert "Epoch: 1/1" in run.output, run.describe()
    checkpoint = torch.load(root / "models" / "checkpoint_epoch=1.pt", map_location="cpu", weights_only=False)
    assert checkpoint["trainer"]["iteration"] == 2 and checkpoint["trainer"]["max_epochs"] == 1


@pytest.mark.slow
def test_3d_training(bundle, tmp_path):
    features = [4, 4, 8, 8, 16, 4]
    settings = {"spatial_dims": 3, "in_channels": 1, "image_size": 32, "features": features, "max_epochs": 1}
    run = bundle.train(tmp_path / "bundle", settings)
    data = tmp_path / "bundle" / "data" / "synthetic_3d"
    assert json.loads((data / "manifest.json").read_text())["spatial_dims"] == 3
    assert len(list((data / "images").glob("*.nii.gz"))) == 80
    assert "val_mean_iou" in run.output
    models = tmp_path / "bundle" / "models"
    assert (models / "checkpoint_epoch=1.pt").is_file()
    network = bundle.load_tiny_network(models / "model.pt", spatial_dims=3, in_channels=1, features=features)
    with torch.no_grad():
        assert network(torch.rand(1, 1, 32, 32, 32)).shape == (1, 2, 32, 32, 32)


def best_val_iou(bundle, trained_bundle) -> float:
    client, mlflow_run = bundle.single_mlflow_run(bundle.sqlite_uri(trained_bundle.root))
    return max(value for _, value in bundle.metric_steps(client, mlflow_run.info.run_id, "val_mean_iou"))


@pytest.mark.slow
def test_evaluate_overlay_writes_metrics_of_the_best_model(bundle, trained_bundle, tmp_path):
    root = bundle.copy_outputs(trained_bundle.root, tmp_path / "bundle")
    configs = f"['{bundle.train_json}','{bundle.evaluate_json}']"
    settings = {k: v for k, v in bundle.tiny.items() if k != "max_epochs"}
    bundle.run("run", "evaluating", "--config_file", configs, "--bundle_root", root, *bundle.overrides(settings))
    with open(root / "eval" / "metrics.csv") as f:
        rows = {row[0]: float(row[1]) for row in csv.reader(f) if row}
    assert set(rows) == {"val_mean_iou", "val_mean_dice"}
    # model.pt is the checkpoint of the best validation IoU, evaluated on the same validation images
    assert rows["val_mean_iou"] == pytest.approx(best_val_iou(bundle, trained_bundle), abs=1e-4)
    with open(root / "eval" / "val_mean_iou_raw.csv") as f:
        raw = list(csv.DictReader(f))
    assert len(raw) == 8 and all(Path(r["filename"]).parent == root / "data" / "synthetic_2d" / "images" for r in raw)
    assert np.mean([float(r["mean"]) for r in raw]) == pytest.approx(rows["val_mean_iou"], abs=1e-4)
    assert sorted(p.name for p in (root / "models").iterdir()) == [
        "checkpoint_epoch=2.pt",
        "model.pt",
        "training_history.json",
        "training_run.json",
    ]


def test_evaluate_without_checkpoint_is_explained(bundle, tmp_path, restore_determinism):
    from monai.bundle import ConfigWorkflow

    workflow = ConfigWorkflow(
        config_file=[str(bundle.train_json), str(bundle.evaluate_json)], workflow_type=None, logging_file=False,
        bundle_root=str(tmp_path), **bundle.tiny_net,
    )  # fmt: skip
    with pytest.raises(Exception) as info:
        workflow.initialize()
    assert any(
        isinstance(e, FileNotFoundError)
        and "checkpoint to evaluate (ckpt_path)" in str(e)
        and str(tmp_path / "models" / "model.pt") in str(e)
        for e in error_chain(info.value)
    ), error_chain(info.value)


@pytest.mark.slow
def test_inference_writes_a_mask_per_image_at_its_own_size(bundle, trained_bundle, tmp_path):
    root = bundle.copy_outputs(trained_bundle.root, tmp_path / "bundle", parts=("models",))
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    rng = np.random.default_rng(0)
    sizes = {"wide.png": (40, 56), "photo.jpg": (70, 100), "tall.png": (90, 33)}
    for name, (height, width) in sizes.items():
        Image.fromarray((rng.random((height, width, 3)) * 255).astype(np.uint8)).save(inputs / name)
    synthetic = sorted((trained_bundle.root / "data" / "synthetic_2d" / "images").glob("*.png"))[:2]
    for path in synthetic:  # images like the training data: the model should find some foreground there
        sizes[path.name] = (128, 128)
        Image.open(path).save(inputs / path.name)
    (inputs / "notes.txt").write_text("not an image")

    bundle.run("run", "inferring", "--config_file", bundle.inference_json, "--bundle_root", root,
               "--input_dir", inputs, *bundle.overrides(bundle.tiny_net))  # fmt: skip
    predictions = root / "eval" / "predictions"
    written = sorted(p.name for p in predictions.iterdir())
    expected = sorted(f"{name.rsplit('.', 1)[0]}_seg.png" for name in sizes)
    assert written == expected
    values = set()
    for name, shape in sizes.items():
        mask = np.asarray(Image.open(predictions / f"{name.rsplit('.', 1)[0]}_seg.png"))
        assert mask.shape == shape, name
        assert mask.dtype == np.uint8
        values |= set(np.unique(mask).tolist())
        assert set(np.unique(mask).tolist()) <= {0, 255}, name
    assert values == {0, 255}


def test_paper_overlay_resolves_to_the_papers_setup(bundle, tmp_path):
    from monai.bundle import ConfigParser
    from monai.losses import DiceCELoss

    parser = ConfigParser()
    parser.read_config([str(bundle.train_json), str(bundle.paper_json)])
    parser["bundle_root"] = str(tmp_path)
    optimizer = parser.get_parsed_content("optimizer")
    assert isinstance(optimizer, torch.optim.SGD)
    assert optimizer.defaults["lr"] == 0.1 and optimizer.defaults["momentum"] == 0.99
    loss = parser.get_parsed_content("loss")
    assert isinstance(loss, DiceCELoss)
    assert loss.lambda_dice == 0.0 and loss.lambda_ce == 1.0
    assert parser.get_parsed_content("train#dataloader#batch_size") == 16
    assert parser.get_parsed_content("train#trainer#max_epochs") == 30
    assert parser.get_parsed_content("adv#epsilon") == 0.1
    assert parser.get_parsed_content("spatial_size") == [128, 128]
    assert parser.get_parsed_content("in_channels") == 3
    assert parser.get_parsed_content("adv#method") == "fgsm"
    # the network is the one the paper's optimizer trains
    network = parser.get_parsed_content("network")
    assert {id(p) for p in network.parameters()} == {id(p) for p in optimizer.param_groups[0]["params"]}
    assert not (tmp_path / "data").exists(), "resolving the overlay must not generate data"
