"""CIFAR ResNets (He et al. 2016, section 4.2) as a timm family: ``cifar_resnet20/32/44/56``.

The standard small model of QAT papers: a 3x3 stem with 16 channels, three stages of ``n`` basic
blocks with 16/32/64 channels (stride 2 at the start of stages 2 and 3), global average pooling and a
``linear`` classifier; depth ``6n + 2``. The shortcut of a block that changes shape is option A by
default (a stride-2 subsample padded with zero channels: no parameters) or option B
(``shortcut="B"``: 1x1 convolution + BatchNorm).

Tensor names follow the public checkpoints of these models (``conv1``, ``bn1``,
``layer{1,2,3}.{i}.conv{1,2}`` / ``bn{1,2}``, ``linear``; option B's ``shortcut.0`` / ``shortcut.1``),
so their state dicts load without a key map. Activations are ``nn.ReLU`` modules, each called once,
so that every tensor an integer runtime needs is a module output (see
:mod:`acs_hf.quantization.integer_graph`).

    import acs_hf, timm
    model = timm.create_model("cifar_resnet20", num_classes=10)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

__all__ = ["CifarResNet", "BasicBlock", "ShortcutA"]

#: Stage widths of every CIFAR ResNet.
WIDTHS = (16, 32, 64)


class ShortcutA(nn.Module):
    """Option-A shortcut: keep every second pixel in each direction and pad the new channels with zeros.

    Both steps keep a quantized tensor on its grid (zero is a code of every LSQ grid), so an integer
    runtime can run them on codes.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 2) -> None:
        super().__init__()
        if out_channels < in_channels:
            raise ValueError(f"ShortcutA: out_channels={out_channels} < in_channels={in_channels}")
        self.stride = stride
        extra = out_channels - in_channels
        self.pad = (extra // 2, extra - extra // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, *self.pad))

    def extra_repr(self) -> str:
        return f"stride={self.stride}, pad_channels={self.pad}"


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with BatchNorm, a shortcut, ReLU after the sum."""

    def __init__(self, in_channels: int, channels: int, stride: int = 1, shortcut: str = "A") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != channels:
            if shortcut == "A":
                self.shortcut = ShortcutA(in_channels, channels, stride)
            else:
                self.shortcut = nn.Sequential(
                    nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False), nn.BatchNorm2d(channels)
                )
        self.act2 = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x)))))
        return self.act2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """A CIFAR ResNet of depth ``6 * blocks + 2`` with timm's model interface.

    Args:
        blocks: basic blocks per stage (3 for ResNet-20, 5 for 32, 7 for 44, 9 for 56).
        num_classes: classifier outputs (0: no classifier, ``forward`` returns pooled features).
        in_chans: input channels.
        shortcut: ``"A"`` (subsample + zero channels, the public weights') or ``"B"`` (1x1 conv + BN).
        drop_rate: dropout before the classifier.
    """

    def __init__(
        self, blocks: int = 3, num_classes: int = 10, in_chans: int = 3, shortcut: str = "A", drop_rate: float = 0.0
    ) -> None:
        super().__init__()
        if shortcut not in ("A", "B"):
            raise ValueError(f"shortcut={shortcut!r} is not one of 'A' (zero-padded subsample), 'B' (1x1 conv + BN)")
        if not isinstance(blocks, int) or blocks < 1:
            raise ValueError(f"blocks={blocks!r} must be an integer >= 1")
        self.num_classes = num_classes
        self.num_features = self.head_hidden_size = WIDTHS[-1]
        self.drop_rate = drop_rate
        self.grad_checkpointing = False
        self.conv1 = nn.Conv2d(in_chans, WIDTHS[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(WIDTHS[0])
        self.act1 = nn.ReLU(inplace=True)
        in_channels = WIDTHS[0]
        for stage, channels in enumerate(WIDTHS, start=1):
            strides = [1 if stage == 1 else 2] + [1] * (blocks - 1)
            layer = []
            for stride in strides:
                layer.append(BasicBlock(in_channels, channels, stride, shortcut))
                in_channels = channels
            self.add_module(f"layer{stage}", nn.Sequential(*layer))
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.linear = nn.Linear(WIDTHS[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.feature_info = [
            {"num_chs": WIDTHS[0], "reduction": 1, "module": "act1"},
            *({"num_chs": c, "reduction": 2**i, "module": f"layer{i + 1}"} for i, c in enumerate(WIDTHS)),
        ]
        for m in self.modules():  # He et al.'s initialisation, as the public training code does
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.linear

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        self.linear = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable  # small enough that activations never need it; kept for timm's API

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv1(x)))
        return self.layer3(self.layer2(self.layer1(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.flatten(self.global_pool(x))
        if self.drop_rate:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return x if pre_logits else self.linear(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _cfg(**kwargs) -> dict:
    # The public weights were trained on CIFAR-10 with ImageNet's mean/std, 32x32, no resize or crop.
    return {
        "num_classes": 10,
        "input_size": (3, 32, 32),
        "pool_size": (8, 8),
        "crop_pct": 1.0,
        "interpolation": "bilinear",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "conv1",
        "classifier": "linear",
        **kwargs,
    }


default_cfgs = generate_default_cfgs(
    {f"cifar_resnet{depth}": _cfg() for depth in (20, 32, 44, 56)}  # no Hub weights: see --pretrained_weights
)


def _create(variant: str, blocks: int, pretrained: bool = False, **kwargs) -> CifarResNet:
    # features_only: the stem and the three stages (feature_info), at strides 1, 1, 2, 4
    return build_model_with_cfg(
        CifarResNet, variant, pretrained, blocks=blocks, feature_cfg={"out_indices": (0, 1, 2, 3)}, **kwargs
    )


@register_model
def cifar_resnet20(pretrained: bool = False, **kwargs) -> CifarResNet:
    """CIFAR ResNet-20 (3 blocks per stage, 0.27M parameters)."""
    return _create("cifar_resnet20", 3, pretrained, **kwargs)


@register_model
def cifar_resnet32(pretrained: bool = False, **kwargs) -> CifarResNet:
    """CIFAR ResNet-32 (5 blocks per stage, 0.46M parameters)."""
    return _create("cifar_resnet32", 5, pretrained, **kwargs)


@register_model
def cifar_resnet44(pretrained: bool = False, **kwargs) -> CifarResNet:
    """CIFAR ResNet-44 (7 blocks per stage, 0.66M parameters)."""
    return _create("cifar_resnet44", 7, pretrained, **kwargs)


@register_model
def cifar_resnet56(pretrained: bool = False, **kwargs) -> CifarResNet:
    """CIFAR ResNet-56 (9 blocks per stage, 0.85M parameters)."""
    return _create("cifar_resnet56", 9, pretrained, **kwargs)
