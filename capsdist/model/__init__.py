"""The EM capsule network: functional routing, capsule layers, and the CapsNet presets."""

from capsdist.model.capsnet import PRESETS, CapsNet
from capsdist.model.routing import em_routing

__all__ = ["CapsNet", "PRESETS", "em_routing"]
