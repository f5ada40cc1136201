"""CapsNet: the smallNORB architecture of the paper, ReLUConv -> PrimaryCaps -> ConvCaps1 -> ConvCaps2 -> ClassCaps.

Sizes for a 32x32 input:  32 -(5x5 s2)-> 14 -(1x1)-> 14 -(3x3 s2)-> 6 -(3x3 s1)-> 4 -> classes.
For a 28x28 input:        28 -> 12 -> 12 -> 5 -> 3 -> classes.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn

from capsdist.model.layers import ClassCaps, ConvCaps, PrimaryCaps, ReLUConv
from capsdist.model.routing import PAPER, RoutingSettings

# A: ReLUConv channels, B: primary capsule types, C and D: ConvCaps1 and ConvCaps2 types.
INITS = ("gritzman", "authors")  # weight initialisations (see WEIGHT_STD in layers.py and _init_as_authors)
PRESETS: dict[str, dict[str, int]] = {
    "full": {"A": 32, "B": 32, "C": 32, "D": 32},  # the paper's 310K-parameter model
    "small": {"A": 64, "B": 8, "C": 16, "D": 16},  # the paper's 68K-parameter model
}


class CapsNet(nn.Module):
    """Matrix capsule network with EM routing.

    forward(images (N, C, H, W)) -> class activations (N, classes) in (0, 1);
    with return_poses=True also class poses (N, classes, 16).
    `routing` defaults to the paper's settings (routing.PAPER); the run config starts from capsdist's measured
    recipe (routing.RECIPE). The class layer routes with final_lambda * routing.class_lambda_scale.
    `routing_impl` (layers.ROUTING_IMPLS) picks the torch or the fused Triton routing for every capsule layer.
    `stem_convs`, `stem_norm` and `stem_pool` deepen, normalise and pool the first layer (layers.ReLUConv); the
    paper has none of them.
    """

    def __init__(
        self,
        *,
        A: int,
        B: int,
        C: int,
        D: int,
        num_classes: int,
        in_channels: int = 1,
        input_size: int = 32,
        routing: RoutingSettings = PAPER,
        coord_add: bool = True,
        init: str = "gritzman",
        stem_convs: int = 0,
        stem_norm: bool = False,
        stem_pool: bool = False,
        routing_checkpoint: bool = False,
        routing_impl: str = "auto",
    ):
        super().__init__()
        if init not in INITS:
            raise ValueError(f"unknown init {init!r}: choose one of {INITS}")
        class_routing = dataclasses.replace(
            routing, final_lambda=routing.final_lambda * routing.class_lambda_scale, class_lambda_scale=1.0
        )
        self.input_size, self.in_channels, self.num_classes = input_size, in_channels, num_classes
        self.relu_conv = ReLUConv(
            in_channels, A, kernel=5, stride=2, extra_convs=stem_convs, norm=stem_norm, pool=stem_pool
        )
        self.primary_caps = PrimaryCaps(A, B)
        how = {"routing_checkpoint": routing_checkpoint, "routing_impl": routing_impl}
        self.conv_caps1 = ConvCaps(B, C, kernel=3, stride=2, routing=routing, **how)
        self.conv_caps2 = ConvCaps(C, D, kernel=3, stride=1, routing=routing, **how)
        self.class_caps = ClassCaps(D, num_classes, routing=class_routing, coord_add=coord_add, **how)
        if init == "authors":
            self._init_as_authors()
        # Receptive-field centre of a position j in input pixels is a * j + b; start from pixel centres.
        a, b, size = 1.0, 0.5, input_size
        for layer in (self.relu_conv, self.primary_caps, self.conv_caps1, self.conv_caps2):
            a, b = a * layer.stride, a * (layer.kernel - 1) / 2 + b
            size = (size - layer.kernel) // layer.stride + 1
            if size < 1:
                raise ValueError(f"input size {input_size} is too small for CapsNet: use at least 28x28")
        self.class_caps.set_geometry((a, b), input_size)

    @torch.no_grad()
    def _init_as_authors(self) -> None:
        """The initialisation read from the authors' capsule_em code (docs/results.md): conv1 std 0.05 and bias
        0.1; primary poses std 0.5; primary activations std 3 with bias -1 (their sigmoid(x - 1), here a
        learnable bias); ConvCaps W std 0.3, beta_u = beta_a = 0.5; ClassCaps W std 0.01, beta_a 1, beta_u 2.
        Their activation formula differs from capsdist's, so this is an ablation, not a transfer."""
        for conv, std, bias in (
            (self.relu_conv.conv, 0.05, 0.1),
            (self.primary_caps.pose, 0.5, 0.0),
            (self.primary_caps.activation, 3.0, -1.0),
        ):
            conv.weight.normal_(0.0, std)
            conv.bias.fill_(bias)
        for layer, std, beta_u, beta_a in (
            (self.conv_caps1, 0.3, 0.5, 0.5),
            (self.conv_caps2, 0.3, 0.5, 0.5),
            (self.class_caps, 0.01, 2.0, 1.0),
        ):
            layer.weight.normal_(0.0, std)
            layer.beta_u.fill_(beta_u)
            layer.beta_a.fill_(beta_a)

    @classmethod
    def from_preset(cls, preset: str, **kwargs) -> "CapsNet":
        """Build a named preset ("full" or "small"); kwargs as for __init__ (num_classes required)."""
        if preset not in PRESETS:
            raise ValueError(f"unknown model preset {preset!r}: choose one of {sorted(PRESETS)}")
        return cls(**PRESETS[preset], **kwargs)

    def capsule_layers(self) -> dict[str, nn.Module]:
        return {
            "primarycaps": self.primary_caps,
            "convcaps1": self.conv_caps1,
            "convcaps2": self.conv_caps2,
            "classcaps": self.class_caps,
        }

    def health_stats(self) -> dict[str, dict[str, float]]:
        """Per capsule layer, from the last forward: mean activation, dead_fraction (capsules below 0.01 on every
        image), saturated_fraction (activations above 0.99) and, for routing layers, the mean assignment entropy
        (nats). Reads the values on the host: call it on log steps only. With routing_checkpoint the routing
        layers' statistics are those of the last chunk of images."""
        return {
            name: {key: float(value) for key, value in layer.last_stats.items()}
            for name, layer in self.capsule_layers().items()
            if layer.last_stats
        }

    def forward(self, images: torch.Tensor, return_poses: bool = False):
        if images.dim() != 4 or images.shape[1] != self.in_channels:
            raise ValueError(f"CapsNet expects images (N, {self.in_channels}, H, W), got {tuple(images.shape)}")
        x = self.relu_conv(images)  # (N, A, H1, W1)
        poses, acts = self.primary_caps(x)  # (N, B, 16, H1, W1), (N, B, H1, W1)
        poses, acts = self.conv_caps1(poses, acts)  # (N, C, 16, H2, W2), (N, C, H2, W2)
        poses, acts = self.conv_caps2(poses, acts)  # (N, D, 16, H3, W3), (N, D, H3, W3)
        class_poses, class_acts = self.class_caps(poses, acts)  # (N, K, 16), (N, K)
        return (class_acts, class_poses) if return_poses else class_acts
