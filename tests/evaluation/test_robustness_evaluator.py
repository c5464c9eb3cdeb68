"""RobustnessEvaluator and AdversarialDatasetWriter in process, on a tiny network and tiny data."""

from __future__ import annotations

import json

import pytest
import torch
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
                                    num_examples=2)  # fmt: skip
    evaluator.run()
    rows = {(r["attack"], r["epsilon"]): r["mean_iou"] for r in evaluator.rows}
    for attack, direction in (("fgsm", "ascend"), ("invfgsm", "descend")):
        for eps in (0.0, 0.05):
            metric = MeanIoU(include_background=False)
            for batch in data:
                images = gradient_sign_attack(net, loss, batch["image"], batch["label"], eps, direction).images
                with torch.no_grad():
                    pred = one_hot(net(images).argmax(1, keepdim=True), 2)
                metric(y_pred=pred, y=one_hot(batch["label"].long(), 2))
            assert rows[attack, eps] == pytest.approx(metric.aggregate().item(), abs=1e-6)
    summary = json.loads((tmp_path / "robustness.json").read_text())
    assert summary["num_images"] == 6 and len(summary["results"]) == 4
    assert (tmp_path / "robustness_examples.png").is_file()


@pytest.mark.parametrize(
    "kwargs, error, message",
    [({"attacks": ["deepfool"]}, ValueError, "unknown attack"), ({"epsilons": [-0.1]}, ValueError, "non-negative"),
     ({"pgd_steps": 0}, ValueError, "pgd_steps"), ({"checkpoint": "missing.pt"}, FileNotFoundError, "missing.pt")],
)  # fmt: skip
def test_bad_options_fail_at_construction(tmp_path, kwargs, error, message, make_tiny_net, make_square_data):
    tiny_net, square_data = make_tiny_net, make_square_data
    with pytest.raises(error, match=message):
        RobustnessEvaluator(
            tiny_net(), DiceCELoss(to_onehot_y=True, softmax=True), batches(square_data), tmp_path, **kwargs
        )


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
