"""The models: EM routing, capsule layers, the CapsNet presets, the CNN baselines, building one by name, and the
losses on their class activations (loss)."""

from capsdist.model.capsnet import INITS, PRESETS, CapsNet
from capsdist.model.layers import ROUTING_IMPLS
from capsdist.model.cnn import CNN_PRESETS, BaselineCNN
from capsdist.model.registry import MODEL_SIZES, build_model
from capsdist.model.loss import LOSSES, MARGIN_SCHEDULES
from capsdist.model.materialised_votes import em_routing
from capsdist.model.routing import PAPER, RECIPE, RoutingSettings

__all__ = [
    "BaselineCNN",
    "CNN_PRESETS",
    "CapsNet",
    "INITS",
    "LOSSES",
    "MARGIN_SCHEDULES",
    "MODEL_SIZES",
    "PAPER",
    "PRESETS",
    "RECIPE",
    "ROUTING_IMPLS",
    "RoutingSettings",
    "build_model",
    "em_routing",
]
