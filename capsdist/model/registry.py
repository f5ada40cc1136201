"""Every model a run config can name (`model.size`), and building one from the config.

Capsule presets (capsnet.PRESETS) and the CNN baselines (cnn.CNN_PRESETS) share one namespace, so the
trainer, evaluation, benchmark and experiments build either the same way and compare them on equal terms.
"""

from __future__ import annotations

import torch.nn as nn

from capsdist.model.capsnet import PRESETS, CapsNet
from capsdist.model.cnn import CNN_PRESETS, BaselineCNN

MODEL_SIZES: tuple[str, ...] = (*PRESETS, *CNN_PRESETS)


def build_model(model_cfg, *, in_channels: int, input_size: int, num_classes: int) -> nn.Module:
    """The model named by a `capsdist.config.ModelConfig`.

    Capsule presets take A..D (where non-zero) and the routing keys from the config; the CNN baselines
    ignore them. Returns a module mapping images (N, C, S, S) to class activations (N, num_classes).
    """
    if model_cfg.size in CNN_PRESETS:
        return BaselineCNN.from_preset(model_cfg.size, num_classes=num_classes, in_channels=in_channels,
                                       input_size=input_size)
    widths = {k: getattr(model_cfg, k) or v for k, v in PRESETS[model_cfg.size].items()}
    return CapsNet(**widths, num_classes=num_classes, in_channels=in_channels, input_size=input_size,
                   iterations=model_cfg.iterations, coord_add=model_cfg.coord_add, alpha=model_cfg.alpha,
                   final_lambda=model_cfg.final_lambda, variance_floor=model_cfg.variance_floor,
                   estep_temperature=model_cfg.estep_temperature, class_lambda_scale=model_cfg.class_lambda_scale,
                   beta_a_scale=model_cfg.beta_a_scale, init=model_cfg.init,
                   routing_checkpoint=model_cfg.routing_checkpoint)
