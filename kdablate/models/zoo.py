"""The CIFAR knowledge-distillation model zoo, registered in ``MODELS``.

Architectures and their sources:

* ``resnet{8,14,20,32,44,56,110}``: CIFAR ResNets of He et al., "Deep Residual
  Learning for Image Recognition" (CVPR 2016): BasicBlocks in three stages of
  widths 16/32/64, depth 6n + 2.
* ``resnet8x4``, ``resnet32x4``: the four-times wider variants of the CRD
  benchmark, widths 64/128/256 after a 32-channel first conv, as in CRD.
* ``resnet50``: the bottleneck ResNet-50 of He et al. as CRD adapts it to
  CIFAR: 3x3 stride-1 stem, no max pool, [3, 4, 6, 3] Bottleneck blocks of
  widths 256/512/1024/2048 (CRD's ``resnetv2.ResNet50``; the ImageNet model is
  ``torchvision`` with ``arch: resnet50``).
* ``wrn_16_1``, ``wrn_16_2``, ``wrn_40_1``, ``wrn_40_2``: Wide ResNets of
  Zagoruyko & Komodakis, "Wide Residual Networks" (BMVC 2016), pre-activation
  blocks, dropout 0.
* ``vgg8``, ``vgg11``, ``vgg13``, ``vgg16``, ``vgg19``: VGG of Simonyan &
  Zisserman, "Very Deep Convolutional Networks for Large-Scale Image
  Recognition" (ICLR 2015), with BatchNorm and a single linear classifier;
  ``vgg11`` / ``vgg16`` / ``vgg19`` are its configurations A / D / E, ``vgg8``
  CRD's configuration S (one conv per stage).
* ``mobilenetv2``: Sandler et al., "MobileNetV2: Inverted Residuals and Linear
  Bottlenecks" (CVPR 2018).
* ``shufflenetv1``: Zhang et al., "ShuffleNet: An Extremely Efficient
  Convolutional Neural Network for Mobile Devices" (CVPR 2018), groups 3,
  stage widths 240/480/960 with 4/8/4 units, as CRD's ``ShuffleV1``.
* ``shufflenetv2``: Ma et al., "ShuffleNet V2: Practical Guidelines for
  Efficient CNN Architecture Design" (ECCV 2018).
* ``torchvision``: any ResNet / ResNeXt / Wide-ResNet / RegNet / MobileNetV2 /
  MobileNetV3 / EfficientNet of ``torchvision.models``, untrained.

Widths, depths, shortcuts (1x1 conv + BN where the shape changes) and stems
follow the CRD benchmark code of Tian, Krishnan & Isola, "Contrastive
Representation Distillation" (ICLR 2020), also used by mdistiller and
torchdistill, so parameter counts match CRD's tables at 100 classes (resnet20
0.28M, resnet56 0.86M, resnet110 1.73M, resnet8x4 1.23M, resnet32x4 7.43M,
resnet50 23.71M, wrn_16_2 0.70M, wrn_40_1 0.57M, wrn_40_2 2.25M, vgg8 3.96M,
vgg13 9.46M, shufflenetv1 0.95M, shufflenetv2 1.36M), and the others equal the
count of CRD's code (wrn_16_1 0.18M, vgg11 9.28M, vgg16 14.77M, vgg19 20.09M).

Every model is ``features`` (input to the last feature map) followed by global
average pooling and a linear ``head``, so class activation maps are exact.
Deviations from CRD: ReLUs are not in-place; ``mobilenetv2`` has a stride-1
first conv by default (CRD: stride 2, so its last map is 2x2 instead of 4x4 on CIFAR;
``stem_stride: 2`` is CRD's, and a CRD checkpoint loads only with it) and
defaults to width 1.0 (CRD's student is ``width_mult: 0.5``); VGG and
MobileNetV2 heads keep PyTorch's default linear initialisation. ``shufflenetv1``
follows CRD, not Zhang et al., in its 1x1 stride-1 stem without max pool and
the ReLU after each depthwise conv.
"""
from __future__ import annotations

import dataclasses
from collections import OrderedDict

import torch
from torch import nn

from kdablate.models.factory import MODELS


def _conv_bn(c_in: int, c_out: int, kernel: int, stride: int = 1, groups: int = 1,
             relu: bool = True, bias: bool = False) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, groups=groups, bias=bias),
        nn.BatchNorm2d(c_out),
    ]
    return nn.Sequential(*layers, nn.ReLU()) if relu else nn.Sequential(*layers)


def _init_fan_out(model: nn.Module) -> None:
    """Kaiming-normal fan-out convs, the initialisation of the CRD reference models."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class _GapNet(nn.Module):
    """``head(mean_hw(features(x)))``: the split that class activation maps need."""

    features: nn.Module
    head: nn.Linear
    linear_glue = True  # forward composes its modules and a mean (``kdablate.linearized``)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


# ----------------------------------------------------------------- ResNets


class _BasicBlock(nn.Module):
    linear_glue = True  # its modules, a sum and its ReLU module (``kdablate.linearized``)

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(_conv_bn(c_in, c_out, 3, stride), _conv_bn(c_out, c_out, 3, relu=False))
        # Projection shortcut ("option B"), as in CRD, rather than He et al.'s zero padding.
        same = stride == 1 and c_in == c_out
        self.shortcut = nn.Identity() if same else _conv_bn(c_in, c_out, 1, stride, relu=False)
        self.act = nn.ReLU()  # a module, not torch.relu: the linearized pass masks it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + self.shortcut(x))


class _CifarResNet(_GapNet):
    """Stem conv, then three stages of (depth - 2) / 6 BasicBlocks; stages 2 and 3 halve H, W."""

    depth: int = 20
    filters: tuple[int, int, int, int] = (16, 16, 32, 64)  # stem, stage 1, 2, 3

    @dataclasses.dataclass(frozen=True)
    class Params:
        width: int = 1  # multiplies every width: resnet20 with width 4 is a "resnet20x4"

        def __post_init__(self) -> None:
            if self.width < 1:
                raise ValueError(f"width must be >= 1, got {self.width}")

    def __init__(self, params: Params, input_shape: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        stem, *widths = (f * params.width for f in self.filters)
        n = (self.depth - 2) // 6
        layers: list[nn.Module] = [_conv_bn(input_shape[0], stem, 3)]
        c_in = stem
        for i, c_out in enumerate(widths):
            for j in range(n):
                layers.append(_BasicBlock(c_in, c_out, 2 if i > 0 and j == 0 else 1))
                c_in = c_out
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c_in, num_classes)
        _init_fan_out(self.features)


@MODELS.register("resnet8")
class ResNet8(_CifarResNet):
    depth = 8


@MODELS.register("resnet14")
class ResNet14(_CifarResNet):
    depth = 14


@MODELS.register("resnet20")
class ResNet20(_CifarResNet):
    depth = 20


@MODELS.register("resnet32")
class ResNet32(_CifarResNet):
    depth = 32


@MODELS.register("resnet44")
class ResNet44(_CifarResNet):
    depth = 44


@MODELS.register("resnet56")
class ResNet56(_CifarResNet):
    depth = 56


@MODELS.register("resnet110")
class ResNet110(_CifarResNet):
    depth = 110


@MODELS.register("resnet8x4")
class ResNet8x4(_CifarResNet):
    depth, filters = 8, (32, 64, 128, 256)


@MODELS.register("resnet32x4")
class ResNet32x4(_CifarResNet):
    depth, filters = 32, (32, 64, 128, 256)


class _Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carrying the stride), 1x1 expand to ``4 * planes``; projection shortcut."""

    linear_glue = True  # its modules, a sum and its ReLU module (``kdablate.linearized``)

    def __init__(self, c_in: int, planes: int, stride: int) -> None:
        super().__init__()
        c_out = 4 * planes
        self.body = nn.Sequential(
            _conv_bn(c_in, planes, 1),
            _conv_bn(planes, planes, 3, stride),
            _conv_bn(planes, c_out, 1, relu=False),
        )
        same = stride == 1 and c_in == c_out
        self.shortcut = nn.Identity() if same else _conv_bn(c_in, c_out, 1, stride, relu=False)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, c_in, H, W) -> (B, 4 * planes, H / stride, W / stride)."""
        return self.act(self.body(x) + self.shortcut(x))


@MODELS.register("resnet50")
class ResNet50(_GapNet):
    """3x3 stride-1 stem of 64, then four stages of 3/4/6/3 Bottlenecks; stages 2-4 halve H, W.

    A 32 px input ends in a (B, 2048, 4, 4) map.
    """

    BLOCKS = (3, 4, 6, 3)

    @dataclasses.dataclass(frozen=True)
    class Params:
        pass

    def __init__(self, params: Params, input_shape: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        layers: list[nn.Module] = [_conv_bn(input_shape[0], 64, 3)]
        c_in = 64
        for i, (planes, n) in enumerate(zip((64, 128, 256, 512), self.BLOCKS)):
            for j in range(n):
                layers.append(_Bottleneck(c_in, planes, 2 if i > 0 and j == 0 else 1))
                c_in = 4 * planes
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c_in, num_classes)
        _init_fan_out(self.features)


# ------------------------------------------------------------ Wide ResNets


class _WideBlock(nn.Module):
    """Pre-activation block; a projection shortcut reads the activated input, as in WRN."""

    linear_glue = True  # its modules and a sum (``kdablate.linearized``)

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.pre = nn.Sequential(nn.BatchNorm2d(c_in), nn.ReLU())
        self.body = nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False),
            nn.BatchNorm2d(c_out), nn.ReLU(),
            nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False),
        )
        same = stride == 1 and c_in == c_out
        self.shortcut = None if same else nn.Conv2d(c_in, c_out, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.pre(x)
        return self.body(a) + (x if self.shortcut is None else self.shortcut(a))


class _WideResNet(_GapNet):
    """WRN-depth-widen: three stages of (depth - 4) / 6 blocks, widths 16k/32k/64k."""

    depth: int = 16
    widen: int = 2

    @dataclasses.dataclass(frozen=True)
    class Params:
        pass

    def __init__(self, params: Params, input_shape: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        n = (self.depth - 4) // 6
        layers: list[nn.Module] = [nn.Conv2d(input_shape[0], 16, 3, 1, 1, bias=False)]
        c_in = 16
        for i, base in enumerate((16, 32, 64)):
            for j in range(n):
                layers.append(_WideBlock(c_in, base * self.widen, 2 if i > 0 and j == 0 else 1))
                c_in = base * self.widen
        # Pre-activation blocks leave their output un-normalised; the final BN-ReLU
        # belongs to the features so CAMs see what the head sees.
        layers += [nn.BatchNorm2d(c_in), nn.ReLU()]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c_in, num_classes)
        _init_fan_out(self.features)


@MODELS.register("wrn_16_1")
class WRN16x1(_WideResNet):
    depth, widen = 16, 1


@MODELS.register("wrn_16_2")
class WRN16x2(_WideResNet):
    depth, widen = 16, 2


@MODELS.register("wrn_40_1")
class WRN40x1(_WideResNet):
    depth, widen = 40, 1


@MODELS.register("wrn_40_2")
class WRN40x2(_WideResNet):
    depth, widen = 40, 2


# --------------------------------------------------------------------- VGG


class _VGG(_GapNet):
    """Five stages of conv-BN-ReLU; max pooling after the first three (and the fourth at >= 64 px)."""

    stages: tuple[tuple[int, ...], ...] = ()

    @dataclasses.dataclass(frozen=True)
    class Params:
        pass

    def __init__(self, params: Params, input_shape: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = input_shape[0]
        # CRD skips the fourth pooling on 32 px inputs, leaving a 4x4 map for the last stage.
        pooled = {0, 1, 2, 3} if min(input_shape[1:]) >= 64 else {0, 1, 2}
        for i, stage in enumerate(self.stages):
            for c_out in stage:
                # Conv bias kept next to BN, as in CRD, so parameter counts match its tables.
                layers.append(_conv_bn(c_in, c_out, 3, bias=True))
                c_in = c_out
            if i in pooled:
                layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c_in, num_classes)
        _init_fan_out(self.features)


@MODELS.register("vgg8")
class VGG8(_VGG):
    stages = ((64,), (128,), (256,), (512,), (512,))


@MODELS.register("vgg11")
class VGG11(_VGG):
    stages = ((64,), (128,), (256, 256), (512, 512), (512, 512))  # configuration A


@MODELS.register("vgg13")
class VGG13(_VGG):
    stages = ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512))  # configuration B


@MODELS.register("vgg16")
class VGG16(_VGG):
    stages = ((64, 64), (128, 128), (256,) * 3, (512,) * 3, (512,) * 3)  # configuration D


@MODELS.register("vgg19")
class VGG19(_VGG):
    stages = ((64, 64), (128, 128), (256,) * 4, (512,) * 4, (512,) * 4)  # configuration E


# -------------------------------------------------------------- MobileNetV2


class _InvertedResidual(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = c_in * expand
        self.residual = stride == 1 and c_in == c_out
        # CRD keeps the 1x1 expansion even at expand == 1 and uses ReLU, not ReLU6.
        self.body = nn.Sequential(
            _conv_bn(c_in, hidden, 1),
            _conv_bn(hidden, hidden, 3, stride, groups=hidden),
            _conv_bn(hidden, c_out, 1, relu=False),  # linear bottleneck
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        return x + out if self.residual else out


@MODELS.register("mobilenetv2")
class MobileNetV2(_GapNet):
    """Inverted residuals; total stride 8 (not 32) so a 32 px input ends in a 4x4 map."""

    # (expansion, channels, blocks, stride); stage 2 has stride 1 for CIFAR, as in CRD.
    SETTING = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2),
               (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))

    @dataclasses.dataclass(frozen=True)
    class Params:
        width_mult: float = 1.0
        stem_stride: int = 1  # CRD's (and its published teachers'): 2

        def __post_init__(self) -> None:
            if self.width_mult * 16 < 1:  # the narrowest stage would have no channels
                raise ValueError(f"width_mult must be >= 1/16, got {self.width_mult}")
            if self.stem_stride not in (1, 2):
                raise ValueError(f"stem_stride must be 1 or 2, got {self.stem_stride}")

    def __init__(self, params: Params, input_shape: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        w = params.width_mult
        c_in = int(32 * w)
        layers: list[nn.Module] = [_conv_bn(input_shape[0], c_in, 3, params.stem_stride)]
        for expand, c, n, s in self.SETTING:
            for j in range(n):
                layers.append(_InvertedResidual(c_in, int(c * w), s if j == 0 else 1, expand))
                c_in = int(c * w)
        last = int(1280 * w) if w > 1.0 else 1280  # narrow models keep the wide last layer
        layers.append(_conv_bn(c_in, last, 1))
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(last, num_classes)
        _init_fan_out(self.features)


# ------------------------------------------------------------- ShuffleNetV2


def _channel_shuffle(x: torch.Tensor, groups: int = 2) -> torch.Tensor:
    b, c, h, w = x.shape
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).reshape(b, c, h, w)


class _ShuffleUnit(nn.Module):
    """Stride-1 unit: half the channels pass through untouched, half go through 1x1-dw3x3-1x1."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        half = channels // 2
        self.branch = nn.Sequential(
            _conv_bn(half, half, 1),
            _conv_bn(half, half, 3, groups=half, relu=False),
            _conv_bn(half, half, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keep, work = x.chunk(2, dim=1)
        return _channel_shuffle(torch.cat([keep, self.branch(work)], dim=1))


class _ShuffleDown(nn.Module):
    """Stride-2 unit: both branches see all channels and each yields half the output."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        mid = c_out // 2
        self.left = nn.Sequential(
            _conv_bn(c_in, c_in, 3, 2, groups=c_in, relu=False),
            _conv_bn(c_in, mid, 1),
        )
        self.right = nn.Sequential(
            _conv_bn(c_in, mid, 1),
            _conv_bn(mid, mid, 3, 2, groups=mid, relu=False),
            _conv_bn(mid, mid, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _channel_shuffle(torch.cat([self.left(x), self.right(x)], dim=1))


@MODELS.register("shufflenetv2")
class ShuffleNetV2(_GapNet):
    """1x1 stem (no max pool, for 32 px), three stages of 4/8/4 units, then a 1x1 conv."""

    # net_size -> (stage widths and last conv width, stride-1 units per stage), from CRD.
    CONFIGS = {
        0.2: ((40, 80, 160, 512), (3, 3, 3)),
        0.3: ((40, 80, 160, 512), (3, 7, 3)),
        0.5: ((48, 96, 192, 1024), (3, 7, 3)),
        1.0: ((116, 232, 464, 1024), (3, 7, 3)),
        1.5: ((176, 352, 704, 1024), (3, 7, 3)),
        2.0: ((224, 488, 976, 2048), (3, 7, 3)),
    }

    @dataclasses.dataclass(frozen=True)
    class Params:
        net_size: float = 1.0

        def __post_init__(self) -> None:
            if self.net_size not in ShuffleNetV2.CONFIGS:
                raise ValueError(f"net_size must be one of {sorted(ShuffleNetV2.CONFIGS)}, got {self.net_size}")

    def __init__(self, params: Params, input_shape: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        widths, units = self.CONFIGS[params.net_size]
        layers: list[nn.Module] = [_conv_bn(input_shape[0], 24, 1)]
        c_in = 24
        for c_out, n in zip(widths[:3], units):
            layers += [_ShuffleDown(c_in, c_out), *(_ShuffleUnit(c_out) for _ in range(n))]
            c_in = c_out
        layers.append(_conv_bn(c_in, widths[3], 1))
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(widths[3], num_classes)


# ------------------------------------------------------------- ShuffleNetV1


class _ShuffleV1Unit(nn.Module):
    """Grouped 1x1, channel shuffle, depthwise 3x3, grouped 1x1 to ``c_branch`` channels.

    Stride 1 adds the input (``c_branch == c_in``); stride 2 concatenates the input
    average-pooled 3x3 / 2, giving ``c_branch + c_in`` channels at half H, W.
    """

    def __init__(self, c_in: int, c_branch: int, stride: int, groups: int, squeeze_groups: int) -> None:
        super().__init__()
        mid = c_branch // 4
        self.squeeze_groups = squeeze_groups
        self.squeeze = _conv_bn(c_in, mid, 1, groups=squeeze_groups)
        self.rest = nn.Sequential(
            _conv_bn(mid, mid, 3, stride, groups=mid),  # CRD keeps this ReLU; Zhang et al. drop it
            _conv_bn(mid, c_branch, 1, groups=groups, relu=False),
        )
        self.pool = nn.AvgPool2d(3, 2, 1) if stride == 2 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, c_in, H, W) -> (B, c_in or c_branch + c_in, H / stride, W / stride)."""
        out = self.rest(_channel_shuffle(self.squeeze(x), self.squeeze_groups))
        if self.pool is None:
            return torch.relu(out + x)
        return torch.relu(torch.cat([out, self.pool(x)], dim=1))


@MODELS.register("shufflenetv1")
class ShuffleNetV1(_GapNet):
    """1x1 stem of 24 (no max pool, for 32 px), three stages of 4/8/4 units, groups 3.

    Each stage opens with a stride-2 unit whose branch yields the stage width minus
    the input width, so the concatenation has the stage width; a 32 px input ends in
    a (B, 960, 4, 4) map.
    """

    GROUPS, WIDTHS, UNITS = 3, (240, 480, 960), (4, 8, 4)  # CRD's ShuffleV1

    @dataclasses.dataclass(frozen=True)
    class Params:
        pass

    def __init__(self, params: Params, input_shape: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        layers: list[nn.Module] = [_conv_bn(input_shape[0], 24, 1)]
        c_in = 24
        for i, (c_out, n) in enumerate(zip(self.WIDTHS, self.UNITS)):
            # The first grouped 1x1 sees only the stem's 24 channels: ungrouped, as in the paper.
            first = _ShuffleV1Unit(c_in, c_out - c_in, 2, self.GROUPS, 1 if i == 0 else self.GROUPS)
            layers += [first, *(_ShuffleV1Unit(c_out, c_out, 1, self.GROUPS, self.GROUPS) for _ in range(n - 1))]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c_in, num_classes)


# -------------------------------------------------------------- torchvision

# Families whose classifier is a single ``fc`` after ``avgpool``, and those with a
# ``features`` trunk and a ``classifier`` Sequential ending in a Linear layer.
_FC_FAMILIES = ("resnet", "resnext", "wide_resnet", "regnet")
_CLASSIFIER_FAMILIES = ("mobilenet_v2", "mobilenet_v3", "efficientnet")


def _check_arch(arch: str) -> None:
    import torchvision

    if not arch.startswith(_FC_FAMILIES + _CLASSIFIER_FAMILIES):
        families = ", ".join(f"{f}*" for f in _FC_FAMILIES + _CLASSIFIER_FAMILIES)
        raise ValueError(f"torchvision arch '{arch}' is not supported; supported families: {families}")
    if arch not in torchvision.models.list_models(module=torchvision.models):
        raise ValueError(f"torchvision has no classification model '{arch}'")


def _adapt_first_conv(net: nn.Module, channels: int) -> None:
    """Give the first conv ``channels`` inputs, reusing (cycling) its initial weights.

    torchvision initialises these convs by fan-out, which does not depend on the
    number of inputs, so sliced weights keep the intended scale.
    """
    name, conv = next((n, m) for n, m in net.named_modules() if isinstance(m, nn.Conv2d))
    new = nn.Conv2d(channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    conv.dilation, bias=conv.bias is not None)
    with torch.no_grad():
        new.weight.copy_(conv.weight[:, torch.arange(channels) % conv.in_channels])
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    parent, _, child = name.rpartition(".")
    setattr(net.get_submodule(parent), child, new)


def _per_location(layer: nn.Module) -> nn.Module:
    """A post-pooling layer moved before pooling: Linear becomes a 1x1 conv."""
    if isinstance(layer, nn.Linear):
        conv = nn.Conv2d(layer.in_features, layer.out_features, 1)
        with torch.no_grad():
            conv.weight.copy_(layer.weight[:, :, None, None])
            conv.bias.copy_(layer.bias)
        return conv
    if isinstance(layer, (nn.Dropout, nn.ReLU, nn.Hardswish, nn.SiLU)):
        return layer
    raise ValueError(f"cannot move {type(layer).__name__} before global pooling")


@MODELS.register("torchvision")
class TorchvisionModel(_GapNet):
    """An untrained ``torchvision.models`` classifier, split into features and head.

    Layers between pooling and the last Linear (MobileNetV3's 1280-unit layer,
    dropout) run per location before pooling, so the CAM is exact; on inputs
    whose last map is 1x1 (32 px into these ImageNet models) nothing changes.
    """

    @dataclasses.dataclass(frozen=True)
    class Params:
        arch: str = "resnet18"

        def __post_init__(self) -> None:
            _check_arch(self.arch)

    def __init__(self, params: Params, input_shape: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        import torchvision

        net = torchvision.models.get_model(params.arch, weights=None, num_classes=num_classes)
        if input_shape[0] != 3:
            _adapt_first_conv(net, input_shape[0])
        if params.arch.startswith(_FC_FAMILIES):
            children = list(net.named_children())
            cut = [n for n, _ in children].index("avgpool")
            self.features = nn.Sequential(OrderedDict(children[:cut]))
            self.head = net.fc
        else:
            *pre, head = net.classifier
            # Flattened, so features.<i> indexes the same block as torchvision's features.<i>.
            self.features = nn.Sequential(*net.features, *(_per_location(m) for m in pre))
            self.head = head
        if not isinstance(self.head, nn.Linear):
            raise ValueError(f"torchvision '{params.arch}' does not end in a Linear layer")
