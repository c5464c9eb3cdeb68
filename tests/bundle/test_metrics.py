"""Per-class IoU and Dice handlers and class names from dataset.json."""

from __future__ import annotations

import json

import pytest
import torch
from monai.data import DataLoader
from monai.engines import SupervisedEvaluator
from monai.handlers import MeanIoUHandler, from_engine
from monai.metrics import compute_dice, compute_iou
from monai.networks.utils import one_hot

from monai_adv.bundle import class_names, per_class_metrics


class _Fixed(torch.nn.Module):
    """Returns the logits it was built with, batch by batch (a network whose predictions are known)."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits, self.calls = logits, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.logits[self.calls * x.shape[0] : (self.calls + 1) * x.shape[0]]
        self.calls += 1
        return out


def test_per_class_metrics_equal_a_direct_computation():
    from monai.transforms import AsDiscreted, Compose

    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (6, 1, 8, 8, 8), generator=generator).float()
    labels[2][labels[2] == 2] = 1  # an image without class 2: left out of that class's mean
    logits = torch.randn(6, 3, 8, 8, 8, generator=generator) + 2 * one_hot(labels.long(), 3)
    items = [{"image": torch.zeros(1, 8, 8, 8), "label": labels[i]} for i in range(6)]
    names = ["anterior", "posterior"]
    post = Compose([AsDiscreted(keys="pred", argmax=True, to_onehot=3), AsDiscreted(keys="label", to_onehot=3)])
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"), val_data_loader=DataLoader(items, batch_size=3), network=_Fixed(logits),
        postprocessing=post,
        key_val_metric={"val_mean_iou": MeanIoUHandler(include_background=False,
                                                       output_transform=from_engine(["pred", "label"]))},
        additional_metrics=per_class_metrics(names),
    )  # fmt: skip
    evaluator.run()
    pred = one_hot(logits.argmax(1, keepdim=True), 3)
    truth = one_hot(labels.long(), 3)
    iou, dice = compute_iou(pred, truth, include_background=False), compute_dice(pred, truth, include_background=False)
    assert torch.isnan(iou[2, 1])
    for k, name in enumerate(names):
        assert evaluator.state.metrics[f"val_iou_{name}"] == pytest.approx(iou[:, k].nanmean().item(), abs=1e-6)
        assert evaluator.state.metrics[f"val_dice_{name}"] == pytest.approx(dice[:, k].nanmean().item(), abs=1e-6)
    # MONAI's foreground mean: each image's mean over its classes, then over images (not over image-class pairs)
    assert evaluator.state.metrics["val_mean_iou"] == pytest.approx(iou.nanmean(1).nanmean().item(), abs=1e-6)
    assert per_class_metrics(["foreground"]) == {}  # binary: the mean is the class


def test_class_names_come_from_dataset_json_and_must_match_out_channels(tmp_path):
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "1": "Anterior",
                                                                  "2": "Posterior Part"}}))  # fmt: skip
    assert class_names(3, tmp_path) == ["anterior", "posterior_part"]
    with pytest.raises(ValueError, match=r"names 3 labels .* out_channels is 2: give --out_channels 3"):
        class_names(2, tmp_path)
    assert class_names(2) == ["foreground"] and class_names(4) == ["class_1", "class_2", "class_3"]
