"""Model families acs_hf adds to timm's registry (registered when ``acs_hf`` is imported)."""

from .cifar_resnet import CifarResNet, ShortcutA

__all__ = ["CifarResNet", "ShortcutA"]
