"""RobustnessEvaluator and AdversarialDatasetWriter in process, on a tiny network and tiny data."""

from __future__ import annotations

import json

import pytest
import torch
from ignite.engine import Events
from monai.losses import DiceCELoss
from monai.metrics import MeanIoU
from monai.networks.utils import one_hot

from monai_adv.attacks.gradient_sign import gradient_sign_attack
from monai_adv.evaluation import AdversarialDatasetWriter, RobustnessEvaluator, save_scaled_image


def batches(square_data, num_batches: int = 2, batch: int = 3, size: int = 16) -> list[dict]:
    out = []
    for seed in range(num_batches):
        images, labels = square_data(batch=batch, size=size, seed=seed)
        out.append({"image": images, "label": labels})
    return out


def test_rows_match_direct_computation(tmp_path, make_tiny_net, make_square_data):
    tiny_net, square_data = make_tiny_net, make_square_data
    net, loss, data = tiny_net(seed=1), DiceCELoss(to_onehot_y=True, softmax=True), batches(square_data)
    evaluator = RobustnessEvaluator(net, loss, data, tmp_path, attacks=["fgsm", "invfgsm"], epsilons=[0, 0.05],
                                    num_examples=2, checks=False)  # fmt: skip
    evaluator.run()
    rows = {(r["attack"], r["epsilon"]): r for r in evaluator.rows}
    for attack, direction in (("fgsm", "ascend"), ("invfgsm", "descend")):
        for eps in (0.0, 0.05):
            metric = MeanIoU(include_background=False)
            for batch in data:
                images = gradient_sign_attack(net, loss, batch["image"], batch["label"], eps, direction).images
                with torch.no_grad():
                    pred = one_hot(net(images).argmax(1, keepdim=True), 2)
                metric(y_pred=pred, y=one_hot(batch["label"].long(), 2))
            assert rows[attack, eps]["mean_iou"] == pytest.approx(metric.aggregate().item(), abs=1e-6)
            assert rows[attack, eps]["loss"] == ("none" if eps == 0 else "DiceCELoss")
    summary = json.loads((tmp_path / "robustness.json").read_text())
    assert summary["num_images"] == 6 and len(summary["results"]) == 4
    assert summary["checks"] == {} and summary["suspect_gradient_masking"] is False
    assert (tmp_path / "robustness_examples.png").is_file()


@pytest.mark.parametrize(
    "kwargs, message",
    [({"attacks": ["deepfool"]}, "unknown attack"), ({"epsilons": [-0.1]}, "non-negative"),
     ({"num_steps": 0}, "num_steps"), ({"restarts": 0}, "restarts"), ({"apgd_losses": ["hinge"]}, "loss"),
     ({"clamp": "bogus"}, "clamp"), ({"example_epsilon": -1.0}, "non-negative"),
     ({"num_steps": 2}, "radii"), ({"num_classes": 3, "class_names": ["a"]}, "class_names")],
)  # fmt: skip
def test_bad_options_fail_at_construction(tmp_path, kwargs, message, make_tiny_net, make_square_data):
    tiny_net, square_data = make_tiny_net, make_square_data
    with pytest.raises(ValueError, match=message):
        RobustnessEvaluator(
            tiny_net(), DiceCELoss(to_onehot_y=True, softmax=True), batches(square_data), tmp_path, **kwargs
        )


STRONG = dict(epsilons=[0.0, 2 / 255, 4 / 255, 8 / 255], num_steps=6, num_examples=2)  # noqa: C408


@pytest.fixture(scope="module")
def evaluated(make_trained_unet, tmp_path_factory, one_thread):
    """The full default attack list on a small BasicUNet trained on squares (a few seconds)."""
    net, data = make_trained_unet()
    evaluator = RobustnessEvaluator(net, DiceCELoss(to_onehot_y=True, softmax=True), data,
                                    tmp_path_factory.mktemp("robust"), example_epsilon=0.1, **STRONG)  # fmt: skip
    evaluator.run()
    return evaluator


def _rows(evaluator) -> dict:
    return {(r["attack"], r["loss"], r["epsilon"]): r for r in evaluator.rows}


def test_ensemble_is_the_worst_case_image_by_image(evaluated):
    members = [("fgsm", None), ("pgd", None), ("segpgd", None), ("cospgd", None), ("apgd", "js"),
               ("apgd", "masked_ce"), ("apgd", "balanced_ce")]  # fmt: skip
    for eps in (2 / 255, 4 / 255, 8 / 255):
        ensemble = evaluated.per_image("ensemble", eps)["iou"]
        parts = torch.stack([evaluated.per_image(a, eps, loss)["iou"] for a, loss in members])
        assert (ensemble <= parts + 1e-7).all()
        assert torch.allclose(ensemble, parts.min(dim=0).values)
        row = next(r for r in evaluated.rows if r["attack"] == "ensemble" and r["epsilon"] == eps)
        assert row["mean_iou"] == pytest.approx(ensemble.mean().item(), abs=1e-6)
        assert row["mean_iou"] <= min(r["mean_iou"] for r in evaluated.rows if r["epsilon"] == eps) + 1e-7
    clean = evaluated.per_image("clean", 0.0)["iou"].mean().item()
    assert clean > 0.8  # the model is a real segmenter before the attack


def test_per_image_file_gives_each_row_mean(evaluated):
    import csv

    with open(evaluated.output_dir / "robustness_per_image.csv") as stream:
        lines = list(csv.DictReader(stream))
    for row in evaluated.rows:
        if row["epsilon"] == 0 and row["attack"] != "ensemble":
            continue
        values = [float(x["iou"]) for x in lines if x["attack"] == row["attack"] and x["loss"] == row["loss"]
                  and float(x["epsilon"]) == pytest.approx(row["epsilon"], rel=1e-5)]  # fmt: skip
        assert len(values) == len(evaluated.per_image("clean", 0)["iou"])
        assert sum(values) / len(values) == pytest.approx(row["mean_iou"], abs=1e-5), row
    names = {x["image"] for x in lines}
    assert len(names) == len(evaluated.per_image("clean", 0)["iou"])  # one name per image, the same in every row


def test_segmentation_attacks_are_no_weaker_than_pgd(evaluated):
    positive = [e for e in STRONG["epsilons"] if e > 0]
    mean = lambda attack: (
        sum(min(r["mean_iou"] for r in evaluated.rows if r["attack"] == attack and r["epsilon"] == e) for e in positive)
        / len(positive)
    )
    pgd = mean("pgd")
    for attack in ("segpgd", "cospgd", "apgd"):
        assert mean(attack) <= pgd + 0.02, attack
    assert mean("ensemble") < mean("fgsm")


def test_rows_keys_checks_and_large_radius(evaluated):
    summary = json.loads((evaluated.output_dir / "robustness.json").read_text())
    row = summary["results"][0]
    assert {"attack", "epsilon", "num_steps", "mean_iou", "mean_dice", "loss", "restarts", "pooled_iou"} <= set(row)
    assert {r["loss"] for r in summary["results"] if r["attack"] == "apgd" and r["epsilon"] > 0} == {
        "js", "masked_ce", "balanced_ce"}  # fmt: skip
    checks = summary["checks"]
    assert set(checks) == {"monotone_in_epsilon", "monotone_in_steps", "large_radius", "noise_weaker",
                           "fgsm_not_stronger"}  # fmt: skip
    # a very large radius breaks the prediction of a real model
    assert checks["large_radius"]["iou"] < 0.1 and checks["large_radius"]["passed"]
    assert summary["suspect_gradient_masking"] == bool(summary["suspect_reasons"])
    # the grid has the adversarial columns at 0.1, which is not one of the epsilons: computed, not dropped
    assert {"FGSM eps=0.1", "InvFGSM eps=0.1", "prediction (FGSM)"} <= set(evaluated.examples)
    assert evaluated.state.metrics["robust_iou/apgd_js/eps_0.0156863"] == _rows(evaluated)[
        "apgd", "js", 4 / 255]["mean_iou"]  # fmt: skip


class _ReversedGradient(torch.nn.Module):
    """Gradient masking on purpose: the forward pass is the network's, but the input gradient is reversed (an
    obfuscated gradient), so a gradient attack walks away from the adversarial direction."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(2 * x.detach() - x)  # the value of x, the gradient of -x


class _Quantised(torch.nn.Module):
    """Gradient masking on purpose: the input is quantised, so the input gradient is zero everywhere."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(torch.round(x * 8) / 8)


def test_masked_gradient_is_flagged(make_trained_unet, tmp_path, one_thread):
    net, data = make_trained_unet()
    loss = DiceCELoss(to_onehot_y=True, softmax=True)
    masked = RobustnessEvaluator(_ReversedGradient(net), loss, data, tmp_path, **STRONG)
    masked.run()
    summary = json.loads((tmp_path / "robustness.json").read_text())
    assert summary["suspect_gradient_masking"] is True
    assert not summary["checks"]["large_radius"]["passed"]
    assert any("epsilon 0.5" in reason for reason in summary["suspect_reasons"])


def test_zero_gradient_stops_the_run(make_trained_unet, tmp_path, one_thread):
    from monai_adv.attacks import ZeroInputGradientError

    net, data = make_trained_unet()
    evaluator = RobustnessEvaluator(_Quantised(net), DiceCELoss(to_onehot_y=True, softmax=True), data, tmp_path,
                                    **STRONG)  # fmt: skip
    with pytest.raises(ZeroInputGradientError, match="zero everywhere.*gradient masking"):
        evaluator.run()
    assert not (tmp_path / "robustness.json").exists()  # no robust IoU is reported


def test_transfer_check_runs_with_a_surrogate(make_trained_unet, tmp_path, one_thread):
    net, data = make_trained_unet()
    surrogate, _ = make_trained_unet(seed=1)
    evaluator = RobustnessEvaluator(net, DiceCELoss(to_onehot_y=True, softmax=True), data, tmp_path,
                                    surrogate=surrogate, attacks=["fgsm", "pgd", "ensemble"], **STRONG)  # fmt: skip
    evaluator.run()
    check = evaluator.checks["transfer_not_stronger"]
    assert isinstance(check["passed"], bool)
    transfer = evaluator.per_image("transfer", 8 / 255)["iou"].mean()
    white = evaluator.per_image("ensemble", 8 / 255)["iou"].mean()
    assert check["passed"] == bool(transfer >= white - 0.02)


def test_three_classes_in_3d_give_per_class_rows(tmp_path, make_tiny_net, one_thread):
    net = make_tiny_net(out_channels=3, spatial_dims=3, seed=4)
    gen = torch.Generator().manual_seed(0)
    data = [{"image": torch.rand(2, 1, 8, 8, 6, generator=gen),
             "label": torch.randint(0, 3, (2, 1, 8, 8, 6), generator=gen).float()}]  # fmt: skip
    evaluator = RobustnessEvaluator(net, DiceCELoss(to_onehot_y=True, softmax=True), data, tmp_path,
                                    epsilons=[0, 0.05], num_steps=3, num_classes=3,
                                    class_names=["anterior", "posterior"], num_examples=1)  # fmt: skip
    evaluator.run()
    row = next(r for r in evaluator.rows if r["attack"] == "ensemble" and r["epsilon"] == 0.05)
    assert {"iou_anterior", "iou_posterior", "dice_anterior", "dice_posterior"} <= set(row)
    per_image = evaluator.per_image("clean", 0)["iou"]
    assert per_image.shape == (2,)


def test_bundle_postprocessing_gives_the_default_scores(tmp_path, make_tiny_net, make_square_data):
    from monai.transforms import Activationsd, AsDiscreted, Compose

    net, loss, data = make_tiny_net(seed=1), DiceCELoss(to_onehot_y=True, softmax=True), batches(make_square_data)
    post = Compose([Activationsd(keys="pred", softmax=True),
                    AsDiscreted(keys=["pred", "label"], argmax=[True, False], to_onehot=2)])  # fmt: skip
    scores = []
    for name, postprocessing in (("default", None), ("bundle", post)):
        evaluator = RobustnessEvaluator(net, loss, data, tmp_path / name, attacks=["fgsm", "pgd"], num_steps=2,
                                        epsilons=[0, 0.05], checks=False, num_examples=0,
                                        postprocessing=postprocessing)  # fmt: skip
        evaluator.run()
        scores.append([r["mean_iou"] for r in evaluator.rows])
    assert scores[0] == pytest.approx(scores[1], abs=1e-6)


def test_writer_refuses_per_image_scaling_and_unknown_methods(tmp_path, make_tiny_net, make_square_data):
    tiny_net, square_data = make_tiny_net, make_square_data
    args = (tiny_net(), DiceCELoss(to_onehot_y=True, softmax=True), batches(square_data), [], [], tmp_path)
    with pytest.raises(ValueError, match="fixed intensity scaling"):
        AdversarialDatasetWriter(*args, intensity_range=None)
    with pytest.raises(ValueError, match="unknown augment method"):
        AdversarialDatasetWriter(*args, methods=["pgd"])


def test_nifti_copies_keep_original_units(tmp_path):
    from monai.transforms import LoadImage

    image = torch.rand(1, 6, 7, 5)
    path = save_scaled_image(image, tmp_path / "ct", intensity_range=(-1000.0, 1000.0))
    loaded = LoadImage(image_only=True, ensure_channel_first=True)(path)
    assert path.endswith(".nii.gz") and loaded.shape == image.shape
    assert torch.allclose(torch.as_tensor(loaded), -1000 + 2000 * image, atol=1e-3)


def test_iterative_epsilons_limit_the_costly_attacks(tmp_path, make_tiny_net, make_square_data):
    net, loss, data = make_tiny_net(seed=1), DiceCELoss(to_onehot_y=True, softmax=True), batches(make_square_data)
    evaluator = RobustnessEvaluator(net, loss, data, tmp_path, epsilons=[0, 0.02, 0.1], iterative_epsilons=[0.02],
                                    num_steps=3, num_examples=0)  # fmt: skip
    evaluator.run()
    measured = {(r["attack"], r["epsilon"]) for r in evaluator.rows if r["epsilon"] > 0}
    assert ("fgsm", 0.1) in measured and ("invfgsm", 0.1) in measured
    assert ("pgd", 0.1) not in measured and ("ensemble", 0.1) not in measured and ("ensemble", 0.02) in measured
    with pytest.raises(ValueError, match="not among the epsilons"):
        RobustnessEvaluator(net, loss, data, tmp_path, epsilons=[0, 0.02], iterative_epsilons=[0.05])


class _StopAfter:
    """Stops a run after ``batches`` batches, as a kill or the end of a session would."""

    def __init__(self, batches: int) -> None:
        self.batches = batches

    def attach(self, engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED(once=self.batches), self.stop)

    def stop(self) -> None:
        raise KeyboardInterrupt("stopped part way")


def _named_batches(square_data, names: list[list[str]]) -> list[dict]:
    out = []
    for seed, batch_names in enumerate(names):
        images, labels = square_data(batch=len(batch_names), size=16, seed=seed)
        out.append({"image": images, "label": labels, "id": batch_names})
    return out


# random starts, noise and the checks' extra runs: every use of the random state a continued run must restore
RANDOM_RUN = {"attacks": ["fgsm", "pgd", "apgd", "noise", "ensemble"], "apgd_losses": ["js"],
              "epsilons": [0, 0.03, 0.06], "num_steps": 3, "num_examples": 2, "masking_epsilon": 0.5}  # fmt: skip


def test_a_stopped_run_continues_from_its_progress_file_with_the_results_of_an_uninterrupted_one(
    tmp_path, make_tiny_net, make_square_data
):
    net, loss = make_tiny_net(seed=3), DiceCELoss(to_onehot_y=True, softmax=True)
    data = _named_batches(make_square_data, [["a", "b"], ["c", "d"], ["e", "f"]])
    whole = RobustnessEvaluator(net, loss, data, tmp_path / "whole", **RANDOM_RUN)
    whole.run()
    progress = tmp_path / "stopped" / "robustness_progress.pt"
    stopped = RobustnessEvaluator(net, loss, data, tmp_path / "stopped", progress_file=progress,
                                  handlers=[_StopAfter(2)], **RANDOM_RUN)  # fmt: skip
    with pytest.raises(KeyboardInterrupt):
        stopped.run()
    assert progress.is_file() and not (tmp_path / "stopped" / "robustness.json").exists()
    torch.manual_seed(1234)  # another process: the global random state is not what the stopped run left
    continued = RobustnessEvaluator(net, loss, data, tmp_path / "stopped", progress_file=progress, **RANDOM_RUN)
    continued.run()
    assert continued.restored_batches == 2
    assert continued.rows == whole.rows  # exactly: the same random starts and noise as without the stop
    assert continued.checks == whole.checks
    per_image = "robustness_per_image.csv"
    assert (tmp_path / "stopped" / per_image).read_text() == (tmp_path / "whole" / per_image).read_text()
    assert [len(v) for v in continued.examples.values()] == [len(v) for v in whole.examples.values()]
    assert not progress.exists()  # complete: a later run measures again
    # its seconds include those the stopped run measured
    report = json.loads((tmp_path / "stopped" / "robustness.json").read_text())
    assert report["continued"]["batches"] == 2 and 0 < report["continued"]["seconds"] < report["seconds"]
    assert json.loads((tmp_path / "whole" / "robustness.json").read_text())["continued"] == {"batches": 0,
                                                                                          "seconds": 0.0}  # fmt: skip


def test_a_progress_file_of_other_weights_is_ignored_and_one_of_other_images_is_refused(
    tmp_path, make_tiny_net, make_square_data
):
    loss = DiceCELoss(to_onehot_y=True, softmax=True)
    data = _named_batches(make_square_data, [["a", "b"], ["c", "d"]])
    progress = tmp_path / "robustness_progress.pt"
    with pytest.raises(KeyboardInterrupt):
        RobustnessEvaluator(make_tiny_net(seed=3), loss, data, tmp_path, progress_file=progress,
                            handlers=[_StopAfter(1)], **RANDOM_RUN).run()  # fmt: skip
    kept = progress.read_bytes()
    other_data = _named_batches(make_square_data, [["x", "y"], ["c", "d"]])
    with pytest.raises(ValueError, match=r"robustness_progress.pt measured images \['a', 'b'\] as batch 1, but the "
                                         r"loader gives \['x', 'y'\]"):  # fmt: skip
        RobustnessEvaluator(make_tiny_net(seed=3), loss, other_data, tmp_path, progress_file=progress,
                            **RANDOM_RUN).run()  # fmt: skip
    assert progress.read_bytes() == kept  # refused: nothing measured is lost
    retrained = RobustnessEvaluator(make_tiny_net(seed=4), loss, data, tmp_path, progress_file=progress, **RANDOM_RUN)
    retrained.run()
    assert retrained.restored_batches == 0 and retrained._num_images == 4
    other_settings = dict(RANDOM_RUN, num_steps=4)
    with pytest.raises(KeyboardInterrupt):
        RobustnessEvaluator(make_tiny_net(seed=3), loss, data, tmp_path, progress_file=progress,
                            handlers=[_StopAfter(1)], **RANDOM_RUN).run()  # fmt: skip
    changed = RobustnessEvaluator(make_tiny_net(seed=3), loss, data, tmp_path, progress_file=progress,
                                  **other_settings)  # fmt: skip
    changed.run()
    assert changed.restored_batches == 0 and changed._num_images == 4
    assert {r["num_steps"] for r in changed.rows if r["attack"] == "pgd" and r["epsilon"] > 0} == {4}
    # another loss (or its settings) is another measurement: the file is ignored
    with pytest.raises(KeyboardInterrupt):
        RobustnessEvaluator(make_tiny_net(seed=3), loss, data, tmp_path, progress_file=progress,
                            handlers=[_StopAfter(1)], **RANDOM_RUN).run()  # fmt: skip
    other_loss = RobustnessEvaluator(make_tiny_net(seed=3), DiceCELoss(to_onehot_y=True, softmax=True, lambda_ce=2.0),
                                     data, tmp_path, progress_file=progress, **RANDOM_RUN)  # fmt: skip
    other_loss.run()
    assert other_loss.restored_batches == 0 and other_loss._num_images == 4
    # the same names with other content (other preprocessing), or fewer batches than were measured, are refused
    with pytest.raises(KeyboardInterrupt):
        RobustnessEvaluator(make_tiny_net(seed=3), loss, data, tmp_path, progress_file=progress,
                            handlers=[_StopAfter(1)], **RANDOM_RUN).run()  # fmt: skip
    kept = progress.read_bytes()
    rescaled = [{**batch, "image": batch["image"] * 0.5} for batch in data]
    with pytest.raises(ValueError, match=r"measured other images or labels as batch 1 \(\['a', 'b'\]\)"):
        RobustnessEvaluator(make_tiny_net(seed=3), loss, rescaled, tmp_path, progress_file=progress,
                            **RANDOM_RUN).run()  # fmt: skip
    assert progress.read_bytes() == kept
    with pytest.raises(KeyboardInterrupt):
        RobustnessEvaluator(make_tiny_net(seed=3), loss, data, tmp_path, progress_file=progress,
                            handlers=[_StopAfter(2)], **RANDOM_RUN).run()  # fmt: skip
    with pytest.raises(ValueError, match=r"measured 2 batches, but the loader gives 1"):
        RobustnessEvaluator(make_tiny_net(seed=3), loss, data[:1], tmp_path, progress_file=progress,
                            **RANDOM_RUN).run()  # fmt: skip
    assert progress.is_file()
    progress.write_bytes(b"cut off by a kill")  # unreadable: only progress is lost
    again = RobustnessEvaluator(make_tiny_net(seed=3), loss, data, tmp_path, progress_file=progress, **RANDOM_RUN)
    again.run()
    assert again.restored_batches == 0 and again._num_images == 4 and not progress.exists()
