"""Model families acs_hf adds to timm's registry (registered once both acs_hf and timm are imported, in either order)."""

from .cifar_resnet import CifarResNet, ShortcutA

__all__ = ["CifarResNet", "ShortcutA"]
