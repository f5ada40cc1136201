"""Every model a run config can name (`model.size`), and building one from the config.

Capsule presets (capsnet.PRESETS) and the CNN baselines (cnn.CNN_PRESETS) share one namespace, so the
trainer, evaluation, benchmark and experiments build either the same way and compare them on equal terms.
"""

from __future__ import annotations

import dataclasses

import torch.nn as nn

from capsdist.model.capsnet import PRESETS, CapsNet
from capsdist.model.cnn import CNN_PRESETS, BaselineCNN
from capsdist.model.routing import RoutingSettings

MODEL_SIZES: tuple[str, ...] = (*PRESETS, *CNN_PRESETS)


def build_model(model_cfg, *, in_channels: int, input_size: int, num_classes: int) -> nn.Module:
    """The model named by a `capsdist.config.ModelConfig`.

    Capsule presets take A..D (where non-zero) and every RoutingSettings field from the config; the CNN baselines
    ignore them. Returns a module mapping images (N, C, S, S) to class activations (N, num_classes).
    """
    if model_cfg.size in CNN_PRESETS:
        return BaselineCNN.from_preset(
            model_cfg.size, num_classes=num_classes, in_channels=in_channels, input_size=input_size
        )
    widths = {k: getattr(model_cfg, k) or v for k, v in PRESETS[model_cfg.size].items()}
    routing = RoutingSettings(**{f.name: getattr(model_cfg, f.name) for f in dataclasses.fields(RoutingSettings)})
    return CapsNet(
        **widths,
        num_classes=num_classes,
        in_channels=in_channels,
        input_size=input_size,
        routing=routing,
        coord_add=model_cfg.coord_add,
        init=model_cfg.init,
        stem_convs=model_cfg.stem_convs,
        stem_norm=model_cfg.stem_norm,
        stem_pool=model_cfg.stem_pool,
        routing_checkpoint=model_cfg.routing_checkpoint,
        routing_impl=model_cfg.routing_impl,
    )
