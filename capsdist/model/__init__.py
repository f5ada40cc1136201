"""The EM capsule network: functional routing, capsule layers, and the CapsNet presets."""

from capsdist.model.capsnet import PRESETS, CapsNet, build_model
from capsdist.model.routing import em_routing

__all__ = ["CapsNet", "PRESETS", "build_model", "em_routing"]
