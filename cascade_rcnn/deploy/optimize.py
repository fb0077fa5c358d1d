"""Inference optimisations: model transformations that keep the detector's outputs within float rounding.

`optimize_for_inference(model)` returns an inference copy of a `CascadeRCNN` that `Detector` runs by default. It
swaps modules and kernels only; the copy runs the model's own forward (`CascadeRCNN.detect`):

- every FrozenBatchNorm2d folded into the convolution before it, conv(x, w * s) + (b - mean * s) with s = gamma /
  sqrt(var + eps), computed at each call from the model's own tensors (`FoldedConv`): one pass over each activation
  map fewer, for one multiply over the weights (about 1% of a forward) and no second copy of the backbone;
- backbone, FPN and RPN head run channels-last (NHWC), oneDNN's native layout: no reorders around each convolution;
- RoIAlign (`roi_align_channels_last`, the model's own CPU kernel) reads the channels-last maps with no copy; RoIs
  pooled and classified 512 at a time;
- on the CPU, each box head's first fc (256 x 7 x 7 -> 1024, most of the heads' work) runs as the equal 7 x 7
  convolution over the channels-last pooled maps (`PooledConv`): oneDNN's convolution instead of the BLAS product. On
  an AMD EPYC, where MKL's sgemm reaches ~190 GFLOP/s on 2 threads and oneDNN ~420, that is 1.2x on a whole R50
  forward (measured); it keeps a channels-last copy of those weights (51 MB per stage for R50);
- optionally (`bf16=True`) convolutions and linear layers in bfloat16 (box arithmetic stays float32).

A mask model's mask heads (`CascadeMaskHeads`, no batch norm to fold) pool the channels-last maps with the same
RoIAlign; each `MaskHead` runs on `MASK_ROIS_PER_CHUNK` RoIs at a time (`RoIChunks`), and in the bf16 copy in
bfloat16 like the box heads: its logits come back float32, and the sigmoid, the mean over heads and the mask
probabilities stay float32.

The float32 copy shares every parameter and buffer with the original but the first fcs' weights, which it re-copies
when they change: it follows any change to the original's weights, and the original keeps its own names and tensors
for saving and training.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn
from torchvision.ops import FrozenBatchNorm2d

from cascade_rcnn.modeling.backbone import conv_norm, folded_weights


def fold_batch_norm(module: nn.Module, lazy: bool = False) -> nn.Module:
    """Fold every FrozenBatchNorm2d that directly follows a convolution into it, in place; returns `module`.

    Pairs are found by the torchvision/mmdetection naming: `convK` + `bnK` siblings, and `Sequential(conv, bn)` (the
    residual `downsample`). The folded norms become `nn.Identity`. With `lazy`, the convolution's weights are left
    as they are and it becomes a `FoldedConv` that folds at each call; otherwise its weights are scaled in place.
    """
    for parent in list(module.modules()):
        children = dict(parent.named_children())
        pairs = [(f"conv{n[2:]}", n) for n in children if n.startswith("bn") and f"conv{n[2:]}" in children]
        if isinstance(parent, nn.Sequential):
            pairs += [(a, b) for a, b in zip(list(children)[:-1], list(children)[1:])]
        for conv_name, bn_name in pairs:
            conv, bn = children[conv_name], children[bn_name]
            if type(conv) is nn.Conv2d and isinstance(bn, FrozenBatchNorm2d):
                if lazy:
                    setattr(parent, conv_name, FoldedConv(conv, bn))
                else:
                    with torch.no_grad():
                        weight, bias = folded_weights(conv, bn)
                        conv.weight.copy_(weight)
                    conv.bias = nn.Parameter(bias, requires_grad=False)
                setattr(parent, bn_name, nn.Identity())
    return module


class FoldedConv(nn.Module):
    """bn(conv(x)) as one convolution whose folded weights are computed at each call from `conv` and `bn`'s own
    tensors: no copy of the weights is kept, and changes to them are followed."""

    def __init__(self, conv: nn.Conv2d, bn: FrozenBatchNorm2d) -> None:
        super().__init__()
        self.conv, self.bn = conv, bn

    def forward(self, x: Tensor) -> Tensor:
        return conv_norm(x, self.conv, self.bn)


class PooledConv(nn.Module):
    """`fc(x.flatten(1))` for pooled maps x (N, C, S, S) computed as the convolution with fc's weights seen as
    (out, C, S, S) filters, channels-last: oneDNN's kernel, on the maps as RoIAlign leaves them. Equal up to float
    rounding. The channels-last weights are a copy, made again when `fc`'s weights change in place; while tracing (the
    ONNX export) and off the CPU it runs `fc` itself."""

    def __init__(self, fc: nn.Linear, channels: int, size: int) -> None:
        super().__init__()
        self.fc, self.shape = fc, (fc.out_features, channels, size, size)
        self.weight, self.version = self._filters()

    def _filters(self) -> tuple[Tensor, int]:
        """The channels-last filters, and the version of fc's weights they were copied from."""
        weight = self.fc.weight
        with torch.no_grad():
            filters = weight.detach().view(self.shape).contiguous(memory_format=torch.channels_last)
        return filters, -1 if weight.is_inference() else weight._version

    def forward(self, x: Tensor) -> Tensor:
        if x.device.type != "cpu" or self.fc.weight.device.type != "cpu" or torch.jit.is_tracing():
            return self.fc(x.flatten(1))
        weight = self.fc.weight
        if (-1 if weight.is_inference() else weight._version) != self.version:
            self.weight, self.version = self._filters()
        x = x.contiguous(memory_format=torch.channels_last)
        return nn.functional.conv2d(x, self.weight, self.fc.bias).flatten(1)


class ChannelsLast(nn.Module):
    """Runs `body` on a channels-last (NHWC) copy of its input; its outputs stay channels-last."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x.contiguous(memory_format=torch.channels_last))


class BFloat16(nn.Module):
    """Runs `body` under bfloat16 autocast (convolutions and linear layers in bf16, accumulating in fp32); its tensor
    outputs come back as float32, so that box arithmetic never runs in bf16."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, *args: object) -> object:
        device = next(self.body.parameters()).device.type
        with torch.autocast(device, dtype=torch.bfloat16):
            return _to_float(self.body(*args))


def _to_float(out: object) -> object:
    if isinstance(out, Tensor):
        return out.float()
    if isinstance(out, (list, tuple)):
        return type(out)(_to_float(o) for o in out)
    return out


# RoIs pooled and classified at a time by the inference copy (`CascadeROIHeads.run_stage`): at 1000 RoIs, the RoI
# stage then needs less memory than the RPN's (measured), and matrix products of 512 rows run as fast as of 1000.
ROIS_PER_CHUNK = 512
# RoIs a mask head runs on at a time: its upsampled maps (256 x 28 x 28 floats, 0.8 MB a RoI, twice over with the
# ReLU) are the largest tensors of a mask model's inference. Peak memory of cascade_mask_rcnn_r50_fpn at 800x1333,
# 100 detections (median of 3 fresh processes): 1540 MB with all at once, 1325 MB 25 at a time, the box model 1302 MB.
MASK_ROIS_PER_CHUNK = 25


class RoIChunks(nn.Module):
    """Runs `body`, a per-RoI module, on `rows` RoIs (its input's first dimension) at a time and concatenates the
    outputs: each RoI's output is its own, while `body`'s intermediate maps exist for one chunk at a time. (Not while
    tracing: the exported graph runs `body` once.)"""

    def __init__(self, body: nn.Module, rows: int) -> None:
        super().__init__()
        self.body, self.rows = body, rows

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[0] <= self.rows or torch.jit.is_tracing():
            return self.body(x)
        return torch.cat([self.body(part) for part in x.split(self.rows)])


def optimize_for_inference(model: nn.Module, bf16: bool = False) -> nn.Module:
    """An inference copy of a `CascadeRCNN` (see the module docstring); `model` itself is left unchanged.

    `bf16` runs the backbone, FPN, RPN head, box heads and mask heads in bfloat16 under autocast (fast only on CPUs with
    bf16 instructions: avx512_bf16 or AMX); feature maps handed to RoIAlign and every head output are float32. Those
    modules then hold bfloat16 copies of their weights (batch norm folded first, in float32), made once, rather than
    autocast's cast at every call: 139 MB more memory for R50, for about 8% less time (measured).
    """
    fast = _shallow_copy(model)
    fast.roi_heads = _shallow_copy(model.roi_heads)
    fast.roi_heads.rois_per_chunk = ROIS_PER_CHUNK
    if model.mask_heads is not None:
        fast.mask_heads = _shallow_copy(model.mask_heads)
        heads = [RoIChunks(h, MASK_ROIS_PER_CHUNK) for h in model.mask_heads.heads]
        fast.mask_heads.heads = nn.ModuleList(heads)
    if not bf16:
        if next(model.parameters()).device.type == "cpu":
            fast.roi_heads.box_heads = nn.ModuleList(_with_pooled_conv(h, model.roi_heads.roi_align.output_size)
                                                     for h in model.roi_heads.box_heads)  # fmt: skip
        fast.backbone = fold_batch_norm(_structure_copy(model.backbone), lazy=True)
        # The stem's input goes channels-last; every later map stays so (oneDNN keeps the input's layout).
        fast.backbone.conv1 = ChannelsLast(fast.backbone.conv1)
        return fast.eval()
    from cascade_rcnn.deploy.extras import warn_if_bf16_emulated

    warn_if_bf16_emulated()
    with torch.no_grad():
        fast.backbone = fold_batch_norm(copy.deepcopy(model.backbone)).to(torch.bfloat16)
        fast.backbone.conv1 = ChannelsLast(fast.backbone.conv1)
        # The backbone's maps are made as the FPN reads them (`FPN.forward`), so both run inside this autocast.
        fast.fpn = BFloat16(copy.deepcopy(model.fpn).to(torch.bfloat16))
        fast.rpn = _shallow_copy(model.rpn)
        fast.rpn.head = BFloat16(copy.deepcopy(model.rpn.head).to(torch.bfloat16))
        heads = [BFloat16(copy.deepcopy(h).to(torch.bfloat16)) for h in model.roi_heads.box_heads]
        fast.roi_heads.box_heads = nn.ModuleList(heads)
        if model.mask_heads is not None:
            # The heads' float32 logits go through the model's own sigmoid and mean (`CascadeMaskHeads.predict`).
            masks = [BFloat16(copy.deepcopy(h).to(torch.bfloat16)) for h in model.mask_heads.heads]
            fast.mask_heads.heads = nn.ModuleList(RoIChunks(h, MASK_ROIS_PER_CHUNK) for h in masks)
    return fast.eval()


def _with_pooled_conv(head: nn.Module, size: int) -> nn.Module:
    """A copy of box head `head` sharing its layers, whose first fc runs as a `PooledConv`."""
    fc = head.shared_fcs[0]
    twin = _shallow_copy(head)
    twin.pooled_fc = PooledConv(fc, fc.in_features // (size * size), size)
    return twin


def _structure_copy(module: nn.Module) -> nn.Module:
    """A copy of `module`'s tree of submodules that shares all of its parameters and buffers."""
    return copy.deepcopy(module, memo={id(t): t for t in [*module.parameters(), *module.buffers()]})


def _shallow_copy(module: nn.Module) -> nn.Module:
    """A new module object sharing `module`'s submodules and tensors, whose own submodules can be replaced."""
    twin = copy.copy(module)
    twin._modules = dict(module._modules)
    twin._parameters = dict(module._parameters)
    twin._buffers = dict(module._buffers)
    return twin


def parameter_versions(module: nn.Module) -> tuple[tuple[int, int], ...]:
    """(id, in-place version) of every parameter and buffer: changes when weights are loaded or trained in place.
    (Tensors made under `torch.inference_mode` have no version counter; they cannot change outside it either.)"""
    return tuple((id(t), -1 if t.is_inference() else t._version) for t in [*module.parameters(), *module.buffers()])
