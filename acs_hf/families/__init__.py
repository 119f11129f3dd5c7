"""Model families acs_hf adds to timm's registry (registered once acs_hf and timm are both imported)."""

from .cifar_resnet import CifarResNet, ShortcutA

__all__ = ["CifarResNet", "ShortcutA"]
