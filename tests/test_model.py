import copy

import pytest
import torch

from cascade_rcnn.modeling.cascade_heads import combine_stage_scores
from cascade_rcnn.config import cascade_rcnn_r50_fpn, cascade_rcnn_r101_fpn
from cascade_rcnn.modeling.detector import build_model
from tests.helpers import tiny_config


def count_parameters(model: torch.nn.Module) -> int:
    """Learned parameters, frozen ones included: trainable tensors plus frozen batch-norm weight and bias (stored as
    buffers), as the published checkpoints count them."""
    frozen_affine = sum(b.numel() for n, b in model.named_buffers() if n.endswith((".weight", ".bias")))
    return sum(p.numel() for p in model.parameters()) + frozen_affine


@pytest.mark.parametrize("preset, millions", [(cascade_rcnn_r50_fpn, 69.4), (cascade_rcnn_r101_fpn, 88.4)])
def test_preset_parameter_counts(preset, millions):
    assert abs(count_parameters(build_model(preset())) / 1e6 - millions) <= 0.1


def test_num_classes_reaches_every_stage():
    model = build_model(tiny_config(num_classes=5, **{"cascade.class_agnostic": False}))
    for head in model.roi_heads.box_heads:
        assert head.fc_cls.out_features == 6  # 5 classes + background
        assert head.fc_reg.out_features == 20


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(tiny_config())


def make_targets():
    return [
        {"boxes": torch.tensor([[10.0, 20.0, 90.0, 110.0], [50.0, 5.0, 140.0, 60.0]]), "labels": torch.tensor([0, 2])},
        {"boxes": torch.tensor([[30.0, 30.0, 100.0, 90.0]]), "labels": torch.tensor([1])},
    ]


def images():
    g = torch.Generator().manual_seed(1)
    return [torch.rand(3, 120, 160, generator=g) * 255, torch.rand(3, 150, 110, generator=g) * 255]


def test_loss_names_and_every_stage_gets_gradient(model):
    model.train()
    model.zero_grad()
    losses = model(images(), make_targets())
    expected = {"loss_rpn_cls", "loss_rpn_box"} | {f"loss_{k}_stage{s}" for k in ("cls", "box") for s in range(3)}
    assert set(losses) == expected
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    for stage, head in enumerate(model.roi_heads.box_heads):
        for name, p in head.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, f"stage {stage} {name} got no gradient"
    assert model.rpn.head.conv.weight.grad.abs().sum() > 0
    assert model.backbone.layer4[0].conv1.weight.grad.abs().sum() > 0
    # Frozen stem and first stage
    assert model.backbone.conv1.weight.grad is None and model.backbone.layer1[0].conv1.weight.grad is None


def test_empty_targets_give_zero_box_losses_and_finite_cls_losses(model):
    model.train()
    empty = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)} for _ in range(2)]
    losses = model(images(), empty)
    for name, value in losses.items():
        assert torch.isfinite(value), name
        if "box" in name:
            assert value.item() == 0.0, name
        else:
            assert value.item() > 0, name
    sum(losses.values()).backward()


def test_training_does_not_mutate_inputs(model):
    model.train()
    imgs, targets = images(), make_targets()
    before = ([i.clone() for i in imgs], copy.deepcopy(targets))
    model(imgs, targets)
    for a, b in zip(imgs, before[0]):
        assert torch.equal(a, b)
    for t, u in zip(targets, before[1]):
        assert torch.equal(t["boxes"], u["boxes"]) and torch.equal(t["labels"], u["labels"])


def test_background_is_the_last_class_column():
    cfg = tiny_config(num_classes=3, **{"postprocess.score_thresh": 0.5})
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    img = [images()[0]]
    for head in model.roi_heads.box_heads:
        head.fc_cls.weight.data.zero_()
        head.fc_cls.bias.data = torch.tensor([0.0, 0.0, 0.0, 20.0])  # background wins
    assert len(model.predict(img)[0]) == 0
    for head in model.roi_heads.box_heads:
        head.fc_cls.bias.data = torch.tensor([0.0, 20.0, 0.0, 0.0])  # class 1 wins
    det = model.predict(img)[0]
    assert len(det) > 0 and (det.labels == 1).all()


def test_score_ensembles():
    logits = [torch.randn(6, 4, generator=torch.Generator().manual_seed(s)) for s in range(3)]
    mean_logits = combine_stage_scores(logits, "mean_logits")
    torch.testing.assert_close(mean_logits, torch.softmax((logits[0] + logits[1] + logits[2]) / 3, dim=1))
    mean_probs = combine_stage_scores(logits, "mean_probs")
    torch.testing.assert_close(mean_probs, sum(torch.softmax(l, 1) for l in logits) / 3)
    torch.testing.assert_close(combine_stage_scores(logits, "last"), torch.softmax(logits[2], 1))
    for probs in (mean_logits, mean_probs):
        torch.testing.assert_close(probs.sum(1), torch.ones(6))


def test_return_stages_gives_each_stage_its_own_detections(model):
    model.eval()
    det = model.predict([images()[0]], return_stages=True)[0]
    assert det.stages is not None and len(det.stages) == 3
    for stage in det.stages:
        assert stage.boxes.shape[1] == 4 and len(stage) <= 100


def test_class_specific_regression_trains_and_predicts():
    torch.manual_seed(0)
    model = build_model(tiny_config(**{"cascade.class_agnostic": False}))
    model.train()
    losses = model(images(), make_targets())
    sum(losses.values()).backward()
    model.eval()
    det = model.predict([images()[1]])[0]
    assert det.boxes.shape[1] == 4
    assert (det.boxes[:, 2] <= 110 + 1e-3).all() and (det.boxes[:, 3] <= 150 + 1e-3).all()


@pytest.mark.parametrize("size", [(64, 96), (50, 75)])  # /32-padded, and odd sizes (interpolation fallback)
def test_fpn_in_place_top_down_equals_upsample_and_add(size):
    """FPN.outputs sums the top-down path in place (a broadcasting view for exact 2x): same values and gradients as
    the textbook laterals[i - 1] + interpolate(laterals[i], nearest)."""
    import torch.nn.functional as F

    from cascade_rcnn.modeling.fpn import FPN

    torch.manual_seed(0)
    fpn = FPN()
    h, w = size
    features = [torch.randn(2, c, -(-h // s), -(-w // s), requires_grad=True)
                for c, s in zip((256, 512, 1024, 2048), (1, 2, 4, 8))]

    def reference(feats):
        laterals = [conv(f) for conv, f in zip(fpn.lateral_convs, feats)]
        for i in range(3, 0, -1):
            laterals[i - 1] = laterals[i - 1] + F.interpolate(laterals[i], size=laterals[i - 1].shape[-2:])
        outs = [conv(lat) for conv, lat in zip(fpn.fpn_convs, laterals)]
        return outs + [F.max_pool2d(outs[-1], 1, stride=2)]

    ours, expected = fpn(features), reference(features)
    assert all(torch.equal(a, b) for a, b in zip(ours, expected))
    grads = torch.autograd.grad(sum(o.square().sum() for o in ours), features)
    expected_grads = torch.autograd.grad(sum(o.square().sum() for o in expected), features)
    assert all((a - b).abs().max() <= 1e-5 * b.abs().max() for a, b in zip(grads, expected_grads))


@pytest.mark.parametrize("rescale", ["before_nms", "after_nms"])
@pytest.mark.parametrize("class_agnostic", [True, False])
def test_no_candidate_above_the_threshold_gives_empty_detections(rescale, class_agnostic):
    """Every stage and the ensemble with nothing left after the score threshold (both rescale rules, both head
    kinds): empty detections of the right shapes, not an error."""
    cfg = tiny_config(**{"postprocess.rescale": rescale, "cascade.class_agnostic": class_agnostic,
                         "postprocess.score_thresh": 1.0})  # fmt: skip
    model = build_model(cfg).eval()
    det = model.predict([images()[0]], return_stages=True)[0]
    for d in [det, *det.stages]:
        assert d.boxes.shape == (0, 4) and d.scores.shape == (0,) and d.labels.shape == (0,)


def test_losses_do_not_depend_on_train_or_eval_mode():
    """`model(images, targets)` is the training computation in either mode: the RPN hands the cascade its training
    proposal counts, and batch norm always normalises with its frozen statistics."""
    model = build_model(tiny_config(**{"rpn.pre_nms_top_n_test": 50, "rpn.post_nms_top_n_test": 20}))
    targets = [{"boxes": torch.tensor([[10.0, 20.0, 80.0, 90.0]]), "labels": torch.tensor([1]),
                "sample_seed": torch.tensor(i)} for i in range(2)]  # fmt: skip
    model.train()
    trained = model(images(), targets)
    model.eval()
    evaluated = model(images(), targets)
    assert trained.keys() == evaluated.keys()
    for key in trained:
        assert torch.equal(trained[key], evaluated[key]), key


@pytest.mark.parametrize("channels_last, fold_norms", [(True, False), (False, True), (True, True)])
def test_the_trainers_fast_forward_is_the_same_computation(channels_last, fold_norms):
    """The trainer's channels-last maps (`train.memory_format`) and batch norms folded into the convolutions
    (`train.fold_norms`) give the plain forward's losses and gradients up to float rounding, every trained
    parameter included. Measured on this random tiny net: losses within 6e-6 relative; gradients within 1.1e-3 of
    their norm (the box heads' first layers, where a ReLU input within rounding of 0 flips; the backbone's within
    5e-4). A misread layout, or a norm folded twice or not at all, is off by the whole gradient."""
    from torchvision.ops import FrozenBatchNorm2d

    torch.manual_seed(0)
    model = build_model(tiny_config()).train()
    with torch.no_grad():  # statistics and affine unlike the identity they are initialised to
        for norm in (m for m in model.backbone.modules() if isinstance(m, FrozenBatchNorm2d)):
            norm.running_mean.normal_(0.0, 0.1), norm.running_var.uniform_(0.5, 2.0)
            norm.weight.uniform_(0.5, 1.5), norm.bias.normal_(0.0, 0.1)
    targets = [{"boxes": torch.tensor([[10.0, 20.0, 80.0, 90.0], [30.0, 5.0, 60.0, 40.0]]),
                "labels": torch.tensor([1, 2]), "sample_seed": torch.tensor(i)} for i in range(2)]  # fmt: skip
    results = []
    for fast in (False, True):
        model.channels_last, model.backbone.fold_norms = fast and channels_last, fast and fold_norms
        model.zero_grad()
        losses = model(images(), targets)
        sum(losses.values()).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((losses, grads))
    (plain, plain_grads), (ours, our_grads) = results
    for key in plain:
        assert abs(float((ours[key] - plain[key]).detach())) <= 1e-4 * abs(float(plain[key].detach())) + 1e-7, key
    assert our_grads.keys() == plain_grads.keys() and any(".bn" in n for n in plain_grads)
    for name, grad in plain_grads.items():
        assert (our_grads[name] - grad).norm() <= 1e-2 * grad.norm() + 1e-9, name


@pytest.mark.parametrize("shape", [(1, 3000), (3000, 1)])
def test_a_one_pixel_sliver_is_detected_not_crashed(shape) -> None:
    """Resized sizes are at least one pixel: a 1 x 3000 image used to resize to nothing (ZeroDivisionError)."""
    from helpers import tiny_config

    from cascade_rcnn.modeling.detector import build_model

    model = build_model(tiny_config()).eval()
    detections = model.predict([torch.rand(3, *shape) * 255])[0]
    if len(detections):
        assert float(detections.boxes[:, 2:].max()) <= max(shape) and float(detections.boxes.min()) >= 0
