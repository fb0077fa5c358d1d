"""ResNet / ResNeXt backbone from torchvision with frozen batch-norm statistics; returns C2..C5.

Parameter names are torchvision's (`conv1`, `bn1`, `layer{1..4}.{i}.conv{1,2,3}`, `...downsample.{0,1}`), which are
also mmdetection's. Batch norm always normalises with its running statistics, which never change (every peer's
detection training at small per-GPU batch sizes). Its affine weight and bias are trained in the stages that are not
frozen (`norm_trainable=True`, mmdetection's `norm_cfg.requires_grad=True` with `norm_eval=True`), or frozen with the
statistics (`norm_trainable=False`, detectron2's FrozenBN). The state_dict keys are the same either way.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.resnet import Bottleneck, ResNet
from torchvision.ops import FrozenBatchNorm2d

LAYERS = {50: [3, 4, 6, 3], 101: [3, 4, 23, 3]}


class TFSamePool(nn.Module):
    """3x3 stride-2 max-pool with TensorFlow 'SAME' padding (extra padding at the bottom/right), as MindSpore's."""

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        pad_h = max((-(-h // 2) - 1) * 2 + 3 - h, 0)
        pad_w = max((-(-w // 2) - 1) * 2 + 3 - w, 0)
        x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2], value=float("-inf"))
        return F.max_pool2d(x, 3, 2)


class FrozenStatsBatchNorm2d(FrozenBatchNorm2d):
    """Batch norm with fixed running statistics (eval-mode normalisation in training too) and a trainable affine
    weight and bias: mmdetection's `BatchNorm2d` with `norm_eval=True`, `requires_grad=True`. A FrozenBatchNorm2d
    with `weight` and `bias` as parameters, so whatever folds or calibrates frozen batch norm handles it alike.

    Its forward is FrozenBatchNorm2d's, x * scale + shift, not torch's eval-mode `batch_norm`: both agree with
    mmdetection within float rounding (the training reference's gradients and losses, measured), and this one's
    gradients do not depend on how images are split into batches (gradient accumulation matches a large batch)."""

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__(num_features, eps)
        weight, bias = self.weight, self.bias
        del self.weight, self.bias  # buffers of FrozenBatchNorm2d
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(bias)


class ResNetBackbone(nn.Module):
    out_channels = (256, 512, 1024, 2048)
    strides = (4, 8, 16, 32)

    def __init__(
        self,
        depth: int = 50,
        groups: int = 1,
        width_per_group: int = 64,
        frozen_stages: int = 1,
        bn_eps: float = 1e-5,
        stride_in_1x1: bool = False,
        stem_pool: str = "pad1",
        norm_trainable: bool = True,
    ) -> None:
        super().__init__()
        norm = FrozenStatsBatchNorm2d if norm_trainable else FrozenBatchNorm2d
        net = ResNet(
            Bottleneck,
            LAYERS[depth],
            groups=groups,
            width_per_group=width_per_group,
            norm_layer=lambda c: norm(c, eps=bn_eps),
        )
        self.conv1, self.bn1, self.relu = net.conv1, net.bn1, net.relu
        self.maxpool = TFSamePool() if stem_pool == "tf_same" else net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        if stride_in_1x1:
            # MSRA/detectron2 blocks downsample in the first 1x1 conv instead of the 3x3 conv.
            for layer in (self.layer2, self.layer3, self.layer4):
                layer[0].conv1.stride, layer[0].conv2.stride = (2, 2), (1, 1)
        # Each frozen batch norm folded into the convolution before it, in the forward (`conv_norm`): one pass over
        # each map instead of two, forward and backward (a batch-2 800x1333 training step in 0.93x the time). The
        # same computation up to float rounding, the parameters and their names unchanged; off by default, so
        # `model(images, targets)` runs mmdetection's ops; the trainer sets it (`train.fold_norms`).
        self.fold_norms = False
        frozen = [self.conv1, self.bn1] + [self.layer1, self.layer2, self.layer3, self.layer4][:frozen_stages]
        for module in frozen if frozen_stages >= 0 else []:
            for p in module.parameters():
                p.requires_grad_(False)

    def forward(self, x: Tensor) -> list[Tensor]:
        """(B, 3, H, W) normalised images -> [C2, C3, C4, C5] at strides 4, 8, 16, 32."""
        return list(self.feature_maps(x))

    def feature_maps(self, x: Tensor) -> Iterator[Tensor]:
        """C2, C3, C4, C5 one at a time: each stage runs when the next map is asked for, and this generator keeps
        no reference to a map it has handed out, so a consumer that lets go of C_k frees it (`FPN.forward`)."""
        if self.fold_norms:
            x = self.maxpool(F.relu(conv_norm(x, self.conv1, self.bn1), inplace=True))
        else:
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            if self.fold_norms:
                for block in layer:
                    x = folded_bottleneck(block, x)
            else:
                x = layer(x)
            yield x


def folded_weights(conv: nn.Conv2d, bn: FrozenBatchNorm2d) -> tuple[Tensor, Tensor]:
    """Weight and bias of the one convolution that computes bn(conv(x)): conv(x, w * s) + (b - mean * s) with
    s = gamma / sqrt(var + eps)."""
    scale = bn.weight * (bn.running_var + bn.eps).rsqrt()
    bias = bn.bias - bn.running_mean * scale
    if conv.bias is not None:
        bias = bias + conv.bias * scale
    dtype = conv.weight.dtype
    return conv.weight * scale.reshape(-1, 1, 1, 1).to(dtype), bias.to(dtype)


def conv_norm(x: Tensor, conv: nn.Conv2d, norm: FrozenBatchNorm2d) -> Tensor:
    """norm(conv(x)) as one convolution: the frozen statistics and affine folded into the weights and bias at each
    call, so gradients reach the convolution's weights and the norm's affine weight and bias as they would unfolded."""
    return conv._conv_forward(x, *folded_weights(conv, norm))


def folded_bottleneck(block: Bottleneck, x: Tensor) -> Tensor:
    """torchvision's `Bottleneck.forward` with every batch norm folded (`conv_norm`)."""
    out = F.relu(conv_norm(x, block.conv1, block.bn1), inplace=True)
    out = F.relu(conv_norm(out, block.conv2, block.bn2), inplace=True)
    out = conv_norm(out, block.conv3, block.bn3)
    identity = x if block.downsample is None else conv_norm(x, block.downsample[0], block.downsample[1])
    return F.relu(out + identity, inplace=True)
