"""The attack specification and the one attack loop: options checked when built, the segmentation losses against
their formulas and against peer implementations (torchattacks, cospgd), APGD, radius schedule, restarts, best
iterate, 3D and several classes."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss

from monai_adv.attacks import ATTACK_LOSSES, AttackSpec, apgd_checkpoints, attack_loss, per_image_iou, run_attack
from monai_adv.transforms import FGSM, FGSMd, InvFGSM, InvFGSMd


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny convolutions: one thread is faster and steadier on a busy machine."""


@pytest.mark.parametrize(
    "options, name",
    [({"clamp": "bogus"}, "clamp"), ({"num_steps": 0}, "num_steps"), ({"epsilon": -0.1}, "epsilon"),
     ({"loss": "hinge"}, "loss"), ({"schedule": "adam"}, "schedule"), ({"restarts": 0}, "restarts"),
     ({"radii": (1.5, 2.0, 1.0), "num_steps": 3}, "radii"), ({"radii": (2.0, 1.5), "num_steps": 3}, "radii"),
     ({"value_range": (1, 0)}, "value_range"), ({"network_mode": "test"}, "network_mode"),
     ({"on_zero_gradient": "shrug"}, "on_zero_gradient"), ({"step_size": 0}, "step_size"),
     ({"schedule": "apgd"}, "loss"), ({"radii": (2.0, 1.5, 1.0), "num_steps": 2}, "radii")],
)  # fmt: skip
def test_bad_options_fail_when_built_naming_the_option(options, name):
    with pytest.raises(ValueError, match=name):
        AttackSpec(**options)
    # the transforms hold a spec: they fail at construction, not at their first call
    with pytest.raises(ValueError, match=name):
        FGSMd(keys="image", **options)
    with pytest.raises(ValueError, match=name):
        FGSM(**options)


def test_unknown_option_and_fixed_direction():
    with pytest.raises(TypeError, match="unknown attack option.*bogus"):
        FGSMd(keys="image", bogus=1)
    with pytest.raises(TypeError, match="fixed direction"):
        InvFGSM(direction="ascend")
    assert InvFGSMd(keys="image", spec=AttackSpec(num_steps=3)).spec.direction == "descend"
    assert FGSM(spec={"epsilon": 0.05}, num_steps=2).spec == AttackSpec(epsilon=0.05, num_steps=2)


def test_spec_round_trip_and_single_step():
    spec = AttackSpec(epsilon=(0.0, 0.1), num_steps="3" if False else 3, random_start="true")
    assert spec.random_start is True and spec.epsilon == (0.0, 0.1)
    assert AttackSpec.create(spec.as_dict()) == spec
    assert AttackSpec().single_step and not AttackSpec(loss="ce").single_step
    assert not AttackSpec(num_steps=2).single_step and not AttackSpec(keep_best=True).single_step


def _logits_and_targets(channels: int, spatial: tuple[int, ...], seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, channels, *spatial, generator=gen, requires_grad=True)
    target = torch.randint(0, max(channels, 2), (3, *spatial), generator=gen)
    return logits, target


@pytest.mark.parametrize("name", ATTACK_LOSSES)
@pytest.mark.parametrize("channels, spatial", [(1, (6, 5)), (2, (6, 5)), (3, (4, 5, 3))])
def test_losses_work_for_sigmoid_softmax_2d_3d(name, channels, spatial):
    logits, target = _logits_and_targets(channels, spatial)
    values = attack_loss(name, logits, target, step=1, num_steps=4)
    assert values.shape == (3,) and torch.isfinite(values).all()
    (grad,) = torch.autograd.grad(values.sum(), logits)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_loss_formulas():
    logits, target = _logits_and_targets(3, (5, 4))
    z = logits.detach()
    ce = F.cross_entropy(z, target, reduction="none")
    p = z.softmax(1)
    onehot = F.one_hot(target, 3).movedim(-1, 1).float()
    correct = (z.argmax(1) == target).float()
    mean = lambda v: v.flatten(1).mean(1)
    assert torch.allclose(attack_loss("ce", z, target), mean(ce))
    lam = 1 / (2 * 4)
    assert torch.allclose(
        attack_loss("segpgd", z, target, 1, 4), mean(((1 - lam) * correct + lam * (1 - correct)) * ce)
    )
    assert torch.allclose(attack_loss("cospgd", z, target), mean(F.cosine_similarity(p, onehot, dim=1) * ce))
    m = (p + onehot) / 2
    js = 0.5 * (p * (p / m).log()).sum(1) + 0.5 * torch.xlogy(onehot, onehot / m).sum(1)
    assert torch.allclose(attack_loss("js", z, target), mean(js), atol=1e-6)
    assert torch.allclose(attack_loss("masked_ce", z, target), mean(correct * ce))
    share = onehot.flatten(2).mean(2)[:, :, None, None]
    weight = 1 - (onehot * share).sum(1)
    assert torch.allclose(attack_loss("balanced_ce", z, target), mean(weight * correct * ce))
    dice = 1 - (2 * (p * onehot)[:, 1:].sum((2, 3)) + 1e-5) / (p[:, 1:].sum((2, 3)) + onehot[:, 1:].sum((2, 3)) + 1e-5)
    assert torch.allclose(attack_loss("dice", z, target), dice.mean(1))


def test_sigmoid_head_is_the_two_class_softmax():
    z, target = _logits_and_targets(1, (6, 6))
    bce = F.binary_cross_entropy_with_logits(z.detach()[:, 0], target.float(), reduction="none")
    assert torch.allclose(attack_loss("ce", z.detach(), target), bce.flatten(1).mean(1), atol=1e-6)
    # IoU of a sigmoid head: foreground where z > 0
    pred = (z.detach()[:, 0] > 0).float()
    label = target.float()
    inter, union = (pred * label).sum((1, 2)), (pred + label).clamp(max=1).sum((1, 2))
    assert torch.allclose(per_image_iou(z.detach(), target), inter / union)


def test_channel_argmax_is_argmax_with_the_first_maximum_on_ties():
    from monai_adv.attacks.losses import channel_argmax

    generator = torch.Generator().manual_seed(0)
    for shape in [(4, 2, 8, 8), (2, 3, 4, 5, 6)]:
        values = torch.randn(shape, generator=generator).round()  # integers: many ties
        values[0, :, 0, 0] = 1.0  # a tie over every channel
        assert torch.equal(channel_argmax(values), values.argmax(dim=1))
        assert torch.equal(channel_argmax(values, keepdim=True), values.argmax(dim=1, keepdim=True))
        assert int(channel_argmax(values)[0, 0, 0].flatten()[0]) == 0


def test_apgd_checkpoints_follow_the_paper():
    assert apgd_checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]
    assert all(0 < c < 10 for c in apgd_checkpoints(10))


@pytest.fixture(scope="module")
def trained(make_trained_unet):
    net, batches = make_trained_unet()
    return net, batches[0]["image"], batches[0]["label"]


@pytest.mark.parametrize(
    "spec",
    [AttackSpec(loss="ce", num_steps=4, random_start=True, keep_best=True),
     AttackSpec(loss="segpgd", num_steps=4, random_start=True),
     AttackSpec(schedule="apgd", loss="js", num_steps=6, radii=(2.0, 1.5, 1.0), keep_best=True),
     AttackSpec(schedule="apgd", loss="masked_ce", num_steps=4, restarts=2, keep_best=True)],
)  # fmt: skip
def test_results_stay_in_the_ball_and_the_range(trained, spec):
    net, images, labels = trained
    eps = 4 / 255
    result = run_attack(net, images, labels, spec, epsilon=eps, generator=torch.Generator().manual_seed(0))
    delta = (result.images - images).abs().amax()
    assert delta <= eps + 1e-6 and delta > eps / 2  # the radius schedule ends inside the epsilon ball
    assert result.images.min() >= 0 and result.images.max() <= 1
    if spec.keep_best or spec.restarts > 1:
        assert result.iou.shape == (4,)


def test_best_iterate_and_restarts_are_never_worse(trained):
    net, images, labels = trained
    eps, target = 8 / 255, labels[:, 0].long()

    def iou_of(x):
        with torch.no_grad():
            return per_image_iou(net(x), target)

    last = AttackSpec(loss="ce", num_steps=5, random_start=True)
    gen = lambda: torch.Generator().manual_seed(3)
    plain = run_attack(net, images, labels, last, epsilon=eps, generator=gen())
    best = run_attack(net, images, labels, last.replace(keep_best=True), epsilon=eps, generator=gen())
    # the same random start and steps: the best iterate is at most the last one's IoU, image by image
    assert (iou_of(best.images) <= iou_of(plain.images) + 1e-6).all()
    assert torch.allclose(best.iou, iou_of(best.images))
    restarted = run_attack(net, images, labels, last.replace(keep_best=True, restarts=3), epsilon=eps, generator=gen())
    assert (restarted.iou <= best.iou + 1e-6).all()


def test_pgd_with_cross_entropy_equals_torchattacks(trained):
    torchattacks = pytest.importorskip("torchattacks")
    net, images, labels = trained
    eps, alpha, steps = 8 / 255, 2 / 255, 5
    torch.manual_seed(11)
    theirs = torchattacks.PGD(net, eps=eps, alpha=alpha, steps=steps, random_start=True)(images, labels[:, 0].long())
    spec = AttackSpec(loss="ce", num_steps=steps, step_size=alpha, random_start=True)
    ours = run_attack(net, images, labels, spec, epsilon=eps, generator=torch.Generator().manual_seed(11)).images
    assert torch.allclose(ours, theirs, atol=1e-6)


@pytest.mark.parametrize("loss", ["segpgd", "cospgd"])
def test_segpgd_and_cospgd_agree_with_the_cospgd_package(trained, loss):
    cospgd = pytest.importorskip("cospgd")
    net, images, labels = trained
    eps, alpha, steps, target = 8 / 255, 2 / 255, 4, labels[:, 0].long()
    # the same random start as ours (u * 2 eps - eps, clamped to [0, 1])
    noise = torch.rand(images.shape, generator=torch.Generator().manual_seed(5))
    x = (images + (noise * (2 * eps) - eps)).clamp(0, 1)
    for t in range(steps):
        x = x.detach().requires_grad_(True)
        outputs = net(x)
        pixel = F.cross_entropy(outputs, target, reduction="none")
        if loss == "segpgd":
            value = cospgd.Attack.segpgd_scale(outputs, target, pixel, t, steps)
        else:
            value = cospgd.Attack.cospgd_scale(outputs, target, pixel, num_classes=2).mean()
        (grad,) = torch.autograd.grad(value, x)
        x = cospgd.Attack.step_inf(x, eps, grad, images, alpha, targeted=False, clamp_min=0, clamp_max=1)
    spec = AttackSpec(loss=loss, num_steps=steps, step_size=alpha, random_start=True)
    ours = run_attack(net, images, labels, spec, epsilon=eps, generator=torch.Generator().manual_seed(5)).images
    assert torch.allclose(ours, x, atol=1e-6)


@pytest.mark.parametrize("loss", [None, "ce", "js", "balanced_ce"])
def test_3d_and_three_classes(make_tiny_net, loss):
    net = make_tiny_net(out_channels=3, spatial_dims=3, seed=2).eval()
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(2, 1, 8, 7, 6, generator=gen)
    labels = torch.randint(0, 3, (2, 1, 8, 7, 6), generator=gen).float()
    spec = AttackSpec(loss=loss, num_steps=3, random_start=True, keep_best=True,
                      schedule="apgd" if loss == "js" else "sign")  # fmt: skip
    result = run_attack(net, images, labels, spec, DiceCELoss(to_onehot_y=True, softmax=True), epsilon=0.05)
    assert result.images.shape == images.shape and (result.images - images).abs().max() <= 0.05 + 1e-6
    assert torch.isfinite(result.loss_before) and result.iou.shape == (2,)


def test_spec_without_loss_needs_a_loss_function(trained):
    net, images, labels = trained
    with pytest.raises(ValueError, match="loss_function"):
        run_attack(net, images, labels, AttackSpec())
    with pytest.raises(ValueError, match="range"):
        run_attack(net, images, labels, AttackSpec(epsilon=(0.0, 0.1), loss="ce"))


def test_default_fgsm_is_unchanged(trained, reference_fgsm):
    # the paper's FGSM through the new loop is bit for bit the reference
    net, images, labels = trained
    loss = DiceCELoss(to_onehot_y=True, softmax=True)
    ours = run_attack(net, images, labels, AttackSpec(epsilon=0.03), loss).images
    assert torch.equal(ours, reference_fgsm(net, loss, images, labels, 0.03, +1))
    assert math.isclose(float((ours - images).abs().max()), 0.03, rel_tol=1e-5)


@pytest.mark.parametrize("bad", [(1.0, 0.0), (0.0, float("inf")), (0.5, 0.5), (0.0,), "ab"])
def test_every_value_range_owner_refuses_the_same_bad_ranges(bad):
    """One check for attacks, clamps and the training augmentation: each names itself and the value."""
    from monai_adv.attacks import check_value_range, clamp_bounds
    from monai_adv.data import training_augmentation

    assert check_value_range((0, 255)) == (0.0, 255.0)
    with pytest.raises(ValueError, match=r"^attack option value_range must be finite \(low, high\)"):
        AttackSpec(value_range=bad)
    with pytest.raises(ValueError, match=r"^training_augmentation: value_range must be finite"):
        training_augmentation("standard", keys=("image", "label"), value_range=bad)
    with pytest.raises(ValueError, match=r"^value_range must be finite"):
        clamp_bounds(torch.zeros(1, 1, 2, 2), "range", bad)
