"""The training recipes against their definitions, on tiny models: N-FGSM, FGSM-RS, PGD, TRADES, schedules, free."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from ignite.engine import Events
from monai.data import DataLoader
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents

from monai_adv.attacks import AttackSpec, run_attack
from monai_adv.engines import (
    PRESET_DEFAULTS,
    RECIPES,
    AdversarialMethod,
    AdversarialTrainingStep,
    TrainingRecipe,
    consistency_kl,
    epsilon_factor,
    recipe_preset,
)

pytestmark = pytest.mark.usefixtures("one_thread")
SIZE = 32
LR = 0.5


@pytest.fixture
def data(make_square_data):
    return make_square_data(batch=4, size=SIZE, seed=5)


def trainer(step, images, labels, network, loss, max_epochs=1, ids=True, **kwargs) -> SupervisedTrainer:
    items = [
        {"image": images[i], "label": labels[i], **({"id": f"case{i}"} if ids else {})} for i in range(len(images))
    ]
    return SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=max_epochs,
        train_data_loader=DataLoader(items, batch_size=len(items), shuffle=False, num_workers=0),
        network=network,
        optimizer=torch.optim.SGD(network.parameters(), lr=LR),
        loss_function=loss,
        iteration_update=step,
        **kwargs,
    )


def spec_of(name: str, **extra) -> AttackSpec:
    preset = recipe_preset(name)
    names = {f.name for f in dataclasses.fields(AttackSpec)}
    return AttackSpec(**{k: v for k, v in preset.items() if k in names}, **extra)


def recipe_of(name: str, **extra) -> TrainingRecipe:
    preset = recipe_preset(name)
    names = {f.name for f in dataclasses.fields(TrainingRecipe)}
    return TrainingRecipe(**{k: v for k, v in preset.items() if k in names}, **extra)


def test_every_preset_builds_a_valid_spec_and_recipe():
    for name in RECIPES:
        preset = recipe_preset(name)
        assert set(PRESET_DEFAULTS) <= set(preset) and preset["recipe"] == name
        spec_of(name), recipe_of(name)
    with pytest.raises(ValueError, match="--adv#recipe must be one of paper, nfgsm.*got 'bogus'"):
        recipe_preset("bogus")


def test_nfgsm_perturbation_is_within_k_plus_one_epsilon_and_not_projected(make_tiny_net, make_dicece, data):
    images, labels = data
    eps = 4 / 255
    spec = spec_of("nfgsm", clamp="none")
    assert (spec.start_radius, spec.relative_step, spec.project) == (2.0, 1.0, False)
    result = run_attack(make_tiny_net(seed=1), images, labels, spec, make_dicece(),
                        generator=torch.Generator().manual_seed(0))  # fmt: skip
    delta = (result.images - images).abs()
    assert float(delta.max()) <= 3 * eps + 1e-6  # (k + 1) * eps with k = 2
    assert float(delta.max()) > 2 * eps  # beyond the epsilon ball: no projection
    assert float((delta > eps).float().mean()) > 0.3
    # with projection (FGSM-RS) the same kind of start stays inside the ball
    projected = run_attack(make_tiny_net(seed=1), images, labels, spec_of("fgsm_rs", clamp="none"), make_dicece(),
                           generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert float((projected.images - images).abs().max()) <= eps + 1e-6


def test_new_attack_options_are_validated():
    with pytest.raises(ValueError, match="project=False"):
        AttackSpec(random_start=True, start_radius=2.0)
    with pytest.raises(ValueError, match="give one"):
        AttackSpec(step_size=0.01, relative_step=1.0)
    with pytest.raises(ValueError, match="relative_step"):
        AttackSpec(relative_step=0)
    assert AttackSpec(relative_step=1.25).step_for(0.1) == pytest.approx(0.125)


def test_consistency_kl_is_its_formula():
    clean, adversarial = torch.randn(2, 3, 5, 5), torch.randn(2, 3, 5, 5)
    p, q = F.softmax(clean, 1), F.softmax(adversarial, 1)
    expected = (p * (p.log() - q.log())).sum(1).mean()
    torch.testing.assert_close(consistency_kl(clean, adversarial), expected)
    assert float(consistency_kl(clean, clean)) == pytest.approx(0.0, abs=1e-7)
    z, w = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)  # a sigmoid head: the 2-class softmax of (0, z)
    torch.testing.assert_close(consistency_kl(z, w), consistency_kl(torch.cat([0 * z, z], 1), torch.cat([0 * w, w], 1)))


@pytest.mark.parametrize("fused", [True, False])
def test_trades_step_trains_on_clean_loss_plus_beta_kl(make_basic_unet, make_dicece, data, fused):
    """TRADES: loss = L(x) + beta * KL(p(x) || p(x_adv)), x_adv the FGSM copy at this step's weights; fused (from the
    clean backward pass) and separate (attack, then one pass over both) give this same update."""
    images, labels = data
    beta, eps = 6.0, 4 / 255
    network, reference = make_basic_unet(seed=3), make_basic_unet(seed=3)
    method = AdversarialMethod(AttackSpec(epsilon=eps, network_mode="train"))
    step = AdversarialTrainingStep([method], recipe_of("trades"), fused=fused)
    engine = trainer(step, images, labels, network, make_dicece())
    engine.run()
    assert step.plan(engine).kind == ("fused" if fused else "separate")
    # the definition, by hand
    reference.train()
    x = images.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(make_dicece()(reference(x), labels), x)
    adversarial = (images + eps * grad.sign()).clamp(0, 1)
    optimizer = torch.optim.SGD(reference.parameters(), lr=LR)
    clean_logits, adv_logits = reference(images), reference(adversarial)
    p, log_q = F.softmax(clean_logits, 1), F.log_softmax(adv_logits, 1)
    kl = (p * (F.log_softmax(clean_logits, 1) - log_q)).sum(1).mean()
    loss = make_dicece()(clean_logits, labels) + beta * kl
    loss.backward()
    optimizer.step()
    torch.testing.assert_close(step.adversarial, adversarial, rtol=0, atol=1e-6)
    assert engine.state.output[0]["loss"] == pytest.approx(float(loss.detach()), rel=1e-4)
    assert float(step.last_values["adv_loss_consistency"]) == pytest.approx(float(kl), rel=1e-4)
    for a, b in zip(network.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_epsilon_warmup_and_start_epoch_per_epoch(make_basic_unet, make_dicece, data):
    recipe = TrainingRecipe(epsilon_warmup_epochs=4, start_epoch=2)
    assert [epsilon_factor(recipe, e) for e in range(1, 7)] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    images, labels = data
    step = AdversarialTrainingStep([AdversarialMethod(AttackSpec(epsilon=0.08))], recipe)
    engine = trainer(step, images, labels, make_basic_unet(seed=1), make_dicece(), max_epochs=4)
    seen = {}
    engine.add_event_handler(
        Events.ITERATION_COMPLETED, lambda e: seen.__setitem__(e.state.epoch, dict(step.last_values))
    )
    engine.run()
    assert "adv_epsilon" not in seen[1]  # a clean epoch
    assert [float(seen[e]["adv_epsilon"]) for e in (2, 3, 4)] == pytest.approx([0.02, 0.04, 0.06])


def test_random_epsilon_is_drawn_per_sample_below_epsilon(make_basic_unet, make_dicece, data):
    images, labels = data
    step = AdversarialTrainingStep([AdversarialMethod(AttackSpec(epsilon=0.1, clamp="none"))],
                                   TrainingRecipe(random_epsilon=True))  # fmt: skip
    step.set_random_state(0)
    trainer(step, images, labels, make_basic_unet(seed=1), make_dicece()).run()
    per_sample = (step.adversarial - images).abs().flatten(1).amax(1)
    assert (per_sample <= 0.1 + 1e-6).all() and len(set(per_sample.round(decimals=5).tolist())) == len(images)


def test_replace_with_fraction_one_trains_on_adversarial_images_only(make_basic_unet, make_dicece, data):
    images, labels = data
    spec = spec_of("fgsm_rs")
    step = AdversarialTrainingStep([AdversarialMethod(spec)], recipe_of("fgsm_rs"))
    step.set_random_state(1)
    trained = []
    engine = trainer(step, images, labels, make_basic_unet(seed=2), make_dicece())
    engine.add_event_handler(
        IterationEvents.FORWARD_COMPLETED, lambda e: trained.append(e.state.output["image"].clone())
    )
    engine.run()
    assert step.plan(engine).kind == "separate" and trained[0].shape == images.shape
    delta = (trained[0] - images).abs().flatten(1).amax(1)
    assert (delta > 0).all() and (delta <= 4 / 255 + 1e-6).all()


def test_free_mode_carries_each_images_perturbation_over_epochs(make_basic_unet, make_dicece, data):
    """Free: one forward/backward per step on x + delta; delta <- clip(delta + eps * sign(grad at x + delta)), kept
    per image id across epochs, and restored from the state dict."""
    images, labels = data
    eps = 0.05
    network = make_basic_unet(seed=4)
    reference = copy.deepcopy(network)
    step = AdversarialTrainingStep([AdversarialMethod(AttackSpec(epsilon=eps, network_mode="train"))],
                                   TrainingRecipe(mode="free"))  # fmt: skip
    engine = trainer(step, images, labels, network, make_dicece(), max_epochs=2)
    forwards = []
    engine.add_event_handler(IterationEvents.FORWARD_COMPLETED, lambda e: forwards.append(1))
    engine.run()
    assert len(forwards) == 2  # one pass per step
    # by hand: epoch 1 trains on x (delta 0), epoch 2 on x + eps * sign(grad at x, weights before step 1)
    optimizer = torch.optim.SGD(reference.parameters(), lr=LR)
    delta = torch.zeros_like(images)
    for _ in range(2):
        x = (images + delta).clamp(0, 1).requires_grad_(True)
        optimizer.zero_grad()
        make_dicece()(reference(x), labels).backward()
        delta = ((x.detach() + eps * x.grad.sign()).clamp(0, 1) - images).clamp(-eps, eps)
        optimizer.step()
    for a, b in zip(network.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    stored = torch.stack([step.deltas[f"case{i}"] for i in range(4)])
    torch.testing.assert_close(stored, delta, rtol=0, atol=1e-6)
    restored = AdversarialTrainingStep([AdversarialMethod(AttackSpec(epsilon=eps))], TrainingRecipe(mode="free"))
    restored.load_state_dict(step.state_dict())
    assert set(restored.deltas) == set(step.deltas)


def test_free_mode_needs_sample_ids(make_basic_unet, make_dicece, data):
    images, labels = data
    step = AdversarialTrainingStep([AdversarialMethod(AttackSpec(epsilon=0.05))], TrainingRecipe(mode="free"))
    with pytest.raises(ValueError, match="filename_or_obj"):
        trainer(step, images, labels, make_basic_unet(), make_dicece(), ids=False).run()


def test_plain_step_equals_the_trainers_own(make_basic_unet, make_dicece, data):
    images, labels = data
    ours, theirs = make_basic_unet(seed=6), make_basic_unet(seed=6)
    trainer(AdversarialTrainingStep(), images, labels, ours, make_dicece(), max_epochs=2).run()
    trainer(None, images, labels, theirs, make_dicece(), max_epochs=2).run()
    for a, b in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_labels_that_do_not_fit_the_prediction_are_named_in_the_fused_step(make_basic_unet, make_dicece, data):
    images, labels = data
    step = AdversarialTrainingStep([AdversarialMethod(AttackSpec(epsilon=0.05))])
    with pytest.raises(ValueError, match=r"class indices 0\.\.1.*255"):
        trainer(step, images, labels * 255, make_basic_unet(), make_dicece()).run()


def test_bad_recipe_options_are_named():
    with pytest.raises(ValueError, match="mode='bogus'"):
        TrainingRecipe(mode="bogus")
    with pytest.raises(ValueError, match="replace_fraction"):
        TrainingRecipe(replace_fraction=0)
    with pytest.raises(ValueError, match="epsilon_warmup_epochs"):
        TrainingRecipe(epsilon_warmup_epochs=-1)
    with pytest.raises(TypeError, match="unknown recipe option"):
        TrainingRecipe.create(bogus=1)
    with pytest.raises(ValueError, match="free"):
        TrainingRecipe(mode="free", consistency_weight=1.0)
    with pytest.raises(ValueError, match="one FGSM method"):
        AdversarialTrainingStep([], TrainingRecipe(mode="free"))


def test_a_non_finite_gradient_stops_the_fused_step(make_basic_unet, make_dicece, data):
    from monai_adv.attacks import NonFiniteLossError

    images, labels = data
    network = make_basic_unet()
    with torch.no_grad():
        next(network.parameters()).fill_(float("nan"))
    step = AdversarialTrainingStep([AdversarialMethod(AttackSpec(epsilon=0.05))])
    with pytest.raises(NonFiniteLossError, match="NaN or Inf"):
        trainer(step, images, labels, network, make_dicece()).run()


def test_a_handler_disabled_at_the_start_augments_once_switched_on(make_basic_unet, make_dicece, data):
    """`enabled` may be flipped at any time: the plan the handler makes at the start must not freeze a disabled
    step as plain."""
    from monai_adv.handlers import AdversarialAugmentationHandler
    from monai_adv.transforms import FGSMd

    images, labels = data
    handler = AdversarialAugmentationHandler(FGSMd(keys="image", epsilon=0.05, batched=True), enabled=False)
    engine = trainer(handler.iteration_update, images, labels, make_basic_unet(), make_dicece(), max_epochs=2)
    handler.attach(engine)
    per_epoch = {}
    engine.add_event_handler(
        Events.EPOCH_COMPLETED, lambda e: per_epoch.__setitem__(e.state.epoch, dict(e.state.metrics))
    )
    engine.add_event_handler(Events.EPOCH_COMPLETED(once=1), lambda e: setattr(handler, "enabled", True))
    engine.run()
    assert "adv_samples" not in per_epoch[1] and per_epoch[2]["adv_samples"] == 4.0
    assert handler.params["adv_step"] == "fused"
