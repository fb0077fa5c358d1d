"""Calibrated random weights: untrained weights that make a detector do a trained one's work.

Untrained weights make a detector degenerate: objectness and class scores sit near one value, NMS keeps a handful of
boxes and nothing passes the score threshold, which fakes a speed-up (and leaves comparisons of two implementations
with nothing to compare). `calibrate_cascade` and `calibrate_torchvision` give any model of either family weights that
behave like a trained model's in the work they cause, as the mmdet reference recipe did
(shared/reference/mmdet/README.md, "How the values were chosen"):

- convolution and linear weights N(0, 2 / fan_in), biases N(0, 0.01^2); frozen batch-norm gamma U(0.5, 1.5) (U(0.1, 0.3)
  on the last norm of a residual branch), beta N(0, 0.1^2);
- frozen batch-norm running statistics = the batch statistics of one forward pass on a calibration image;
- on that image, the RPN objectness logits scaled to std 1.5 and centred per anchor, minus 3; RPN deltas std 0.15;
  each box head's class logits scaled to std 4 and centred per class, with +10 on background; its deltas std 1.5;
- a mask model's mask-head logits (on the final detections) scaled to std 4 and centred per class, so that about half
  of each box's cells are in its mask: pasting does a trained model's work, and comparisons see both sides.

Used by `cascade-rcnn benchmark` and by the tests that compare inference paths on real images.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torchvision.ops import FrozenBatchNorm2d


def randomize_weights(model: nn.Module, seed: int = 0) -> None:
    """Re-draw every conv/linear weight and bias and every frozen batch-norm affine, in place (see module docstring)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                fan_in = module.weight[0].numel()
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * math.sqrt(2.0 / fan_in))
                if module.bias is not None:
                    module.bias.copy_(torch.randn(module.bias.shape, generator=gen) * 0.01)
            elif isinstance(module, FrozenBatchNorm2d):
                # Small gamma on the norm that ends a residual branch keeps activations bounded through 16+ blocks.
                low, high = (0.1, 0.3) if name.endswith(("bn3", "downsample.1")) else (0.5, 1.5)
                module.weight.copy_(torch.rand(module.weight.shape, generator=gen) * (high - low) + low)
                module.bias.copy_(torch.randn(module.bias.shape, generator=gen) * 0.1)
                module.running_mean.zero_()
                module.running_var.fill_(1.0)


@dataclass
class OutputCalibration:
    """How to rescale one conv/linear layer so its outputs on the calibration image have a given spread.

    The weight is multiplied by one scalar so that the outputs (bias excluded; centred per output channel when
    `centre`) have std `std`; the bias becomes `shift` (per output channel), minus the per-channel mean of the rescaled
    outputs when `centre`.
    """

    layer: nn.Module
    std: float
    centre: bool = False
    shift: Tensor | float = 0.0

    def apply(self, outputs: Tensor) -> tuple[float, Tensor]:
        """Rescale the layer for its bias-free `outputs` (R, C); returns the weight scale and the new bias."""
        mean = outputs.mean(dim=0) if self.centre else torch.zeros(outputs.shape[1])
        scale = self.std / max((outputs - mean).std().item(), 1e-12)
        bias = torch.zeros(outputs.shape[1]) + self.shift - mean * scale
        with torch.no_grad():
            self.layer.weight.mul_(scale)
            if self.layer.bias is not None:
                self.layer.bias.copy_(bias)
        return scale, bias


def _bias_free_rows(module: nn.Module, output: Tensor) -> Tensor:
    """A conv's (B, C, H, W) or a linear's (N, C) output as (rows, C), with the layer's bias taken off."""
    out = output.detach().float()
    if out.dim() == 4:
        out = out.permute(0, 2, 3, 1).reshape(-1, out.shape[1])
    return out if module.bias is None else out - module.bias.detach().float()


def calibrate(
    model: nn.Module,
    forward: Callable[[], object],
    dense: list[OutputCalibration],
    heads: list[OutputCalibration],
) -> None:
    """Calibrate `model` in two forward passes.

    Pass 1 sets every FrozenBatchNorm2d's running mean/var to the batch statistics (unbiased variance) of its input, in
    execution order so each sees already-calibrated inputs, and collects the outputs of the `dense` layers (the RPN
    head's, called once per level; rescaled after the pass, as nothing in that pass depends on them). Pass 2 rescales
    each of `heads` (layers called once per forward, e.g. one per cascade stage) inside the pass, so a later stage
    sees the calibrated outputs of the earlier ones.
    """
    collected: dict[int, list[Tensor]] = {id(c.layer): [] for c in dense}

    def set_stats(module: FrozenBatchNorm2d, inputs: tuple[Tensor, ...]) -> None:
        x = inputs[0].detach().float().transpose(0, 1).flatten(1)
        module.running_mean.copy_(x.mean(dim=1))
        module.running_var.copy_(x.var(dim=1))

    def collect(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        collected[id(module)].append(_bias_free_rows(module, output))

    by_layer = {id(c.layer): c for c in heads}
    done: set[int] = set()

    def rescale(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
        if id(module) in done:
            raise RuntimeError(f"calibration: {module} is called more than once per forward")
        done.add(id(module))
        rows = _bias_free_rows(module, output)
        scale, bias = by_layer[id(module)].apply(rows)
        return (rows * scale + bias).reshape(output.shape).to(output.dtype)

    with torch.inference_mode(False), torch.no_grad():
        handles = [m.register_forward_pre_hook(set_stats) for m in model.modules() if isinstance(m, FrozenBatchNorm2d)]
        handles += [c.layer.register_forward_hook(collect) for c in dense]
        try:
            forward()
        finally:
            for h in handles:
                h.remove()
        for c in dense:
            if not collected[id(c.layer)]:
                raise RuntimeError(f"calibration: {c.layer} was not called")
            c.apply(torch.cat(collected[id(c.layer)]))
        handles = [c.layer.register_forward_hook(rescale) for c in heads]
        try:
            forward()
        finally:
            for h in handles:
                h.remove()


def calibrate_cascade(
    model: nn.Module,
    image: Tensor,
    seed: int = 0,
    delta_std: float = 1.5,
    logit_std: float = 4.0,
    background_logit: float = 10.0,
    mask_logit_std: float = 4.0,
) -> None:
    """Give a `CascadeRCNN` calibrated random weights on `image` ((3, H, W) RGB 0-255, any size: the model resizes it).

    `delta_std` is the spread of the box heads' raw deltas, `logit_std` that of their class logits, `background_logit`
    the background's offset, and `mask_logit_std` the spread of a mask model's mask logits. A random network's rounding
    errors grow with its logits, and its features change within a pixel, so a box error becomes a feature error at the
    next stage: smaller values give better-conditioned weights (for comparing two implementations) with as many
    detections.
    """
    model.eval()
    randomize_weights(model, seed)
    rpn = model.rpn.head
    dense = [OutputCalibration(rpn.cls_logits, 1.5, True, -3.0), OutputCalibration(rpn.bbox_pred, 0.15)]
    heads = []
    for head in model.roi_heads.box_heads:
        num_classes = head.fc_cls.out_features - 1
        shift = torch.zeros(num_classes + 1)
        shift[num_classes] = background_logit  # background is the last column
        heads += [OutputCalibration(head.fc_cls, logit_std, True, shift), OutputCalibration(head.fc_reg, delta_std)]
    if getattr(model, "mask_heads", None) is not None:
        # After the box heads in the pass: each mask head sees the calibrated model's final detections.
        heads += [OutputCalibration(head.logits, mask_logit_std, True) for head in model.mask_heads.heads]
    calibrate(model, lambda: model.predict([image]), dense, heads)


def calibrate_torchvision(model: nn.Module, image: Tensor, seed: int = 0) -> None:
    """The same calibration for a torchvision `FasterRCNN` (background is its class 0)."""
    model.eval()
    randomize_weights(model, seed)
    rpn, predictor = model.rpn.head, model.roi_heads.box_predictor
    shift = torch.zeros(predictor.cls_score.out_features)
    shift[0] = 10.0
    dense = [OutputCalibration(rpn.cls_logits, 1.5, True, -3.0), OutputCalibration(rpn.bbox_pred, 0.15)]
    heads = [OutputCalibration(predictor.cls_score, 4.0, True, shift), OutputCalibration(predictor.bbox_pred, 1.5)]
    calibrate(model, lambda: model([image / 255.0]), dense, heads)
