"""The models: EM routing, capsule layers, the CapsNet presets, the CNN baselines, and building one by name."""

from capsdist.model.capsnet import PRESETS, CapsNet
from capsdist.model.cnn import CNN_PRESETS, BaselineCNN
from capsdist.model.registry import MODEL_SIZES, build_model
from capsdist.model.routing import em_routing

__all__ = ["BaselineCNN", "CNN_PRESETS", "CapsNet", "MODEL_SIZES", "PRESETS", "build_model", "em_routing"]
