"""``--adv#recipe NAME`` in the bundle: a named preset that raw overrides still change, tracked as what runs."""

from __future__ import annotations

import re

import pytest
import torch


@pytest.mark.parametrize(
    "recipe,overrides,step,params",
    [
        ("trades", {}, "fused", {"adv_consistency_weight": "6.0", "adv_mode": "append"}),
        ("nfgsm", {"adv#epsilon": 0.02}, "separate", {"adv_epsilon": "0.02", "adv_mode": "replace"}),
        ("free", {}, "free", {"adv_mode": "free"}),
    ],
)
def test_a_recipe_trains_and_the_log_says_what_ran(bundle, tmp_path, recipe, overrides, step, params):
    run = bundle.train(tmp_path / "bundle", {"adv#recipe": recipe, "max_epochs": 1, **overrides}, tracking="mlflow")
    assert (run.root / "models" / "model.pt").is_file(), run.describe()
    assert re.search(rf"adversarial training step: {step} \(", run.output), run.output[-3000:]
    _, mlflow_run = bundle.single_mlflow_run(bundle.sqlite_uri(run.root))
    tracked = mlflow_run.data.params
    assert tracked["adv_step"] == step and tracked["adv_fused"] == str(step == "fused")
    assert {k: tracked.get(k) for k in params} == params
    assert "adv_samples" in mlflow_run.data.metrics


def test_finetune_starts_from_init_ckpt(bundle, trained_bundle, tmp_path):
    """--adv#recipe finetune --init_ckpt model.pt: the authors' protocol, continuing a clean training's weights."""
    start = trained_bundle.root / "models" / "model.pt"
    weights = torch.load(start, map_location="cpu", weights_only=True)
    root = tmp_path / "finetune"
    run = bundle.train(root, {"adv#recipe": "finetune", "init_ckpt": start, "max_epochs": 1, "learning_rate": 1e-9})
    assert "adversarial training step: separate" in run.output
    tuned = torch.load(root / "models" / "model.pt", map_location="cpu", weights_only=True)
    # at learning rate 1e-9 the weights stay where they started: at init_ckpt's, not at a fresh network's
    assert all(torch.allclose(weights[k], tuned[k], atol=1e-6) for k in weights)


def test_unknown_recipe_and_a_misplaced_method_name_the_fix(bundle, tmp_path):
    run = bundle.train(tmp_path / "a", {"adv#recipe": "madry"}, expect_success=False)
    assert run.returncode != 0
    assert run.output.strip().splitlines()[-1].startswith("monai-adv: error:"), run.output[-2000:]
    assert "--adv#recipe must be one of paper, nfgsm" in run.output.strip().splitlines()[-1]
    run = bundle.train(tmp_path / "b", {"adv#method": "trades"}, expect_success=False)
    assert "--adv#recipe trades" in run.output.strip().splitlines()[-1], run.output[-2000:]


def test_free_mode_perturbations_are_saved_with_the_checkpoint_and_resumed(bundle, tmp_path):
    """--adv#recipe free keeps one perturbation per training image (keyed by its file): in the checkpoint, within
    epsilon, and carried on by --resume true."""
    root = tmp_path / "free"
    settings = {"adv#recipe": "free", "adv#epsilon": 0.05, "max_epochs": 1}
    bundle.train(root, settings)
    first = torch.load(root / "models" / "checkpoint_epoch=1.pt", map_location="cpu", weights_only=True)
    deltas = first["adv_step"]["deltas"]
    assert len(deltas) == 16 and all(d.shape == (3, 32, 32) for d in deltas.values())
    assert 0 < max(float(d.abs().max()) for d in deltas.values()) <= 0.05 + 1e-6
    bundle.train(root, {**settings, "max_epochs": 2, "resume": "true"})
    second = torch.load(root / "models" / "checkpoint_epoch=2.pt", map_location="cpu", weights_only=True)
    assert set(second["adv_step"]["deltas"]) == set(deltas)
    # Epoch 2 continued from epoch 1's perturbations: where epoch 1 took a full step (|delta| = eps) and the sign
    # flipped, delta + eps * sign is 0. A fresh start would give |delta| = eps at every such pixel.
    before = torch.stack([deltas[k] for k in sorted(deltas)])
    after = torch.stack([second["adv_step"]["deltas"][k] for k in sorted(deltas)])
    full_step = before.abs() > 0.99 * 0.05
    flipped_back = (after.abs() < 0.5 * 0.05) & full_step
    assert float(flipped_back.sum()) / float(full_step.sum()) > 0.01
