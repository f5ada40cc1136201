"""The CNN baselines that capsule figures are compared with, trained by the same trainer, data and schedule.

cnn        the paper's baseline (Hinton, Sabour, Frosst 2018, section 5): two 5x5 convolutions with 32 and
           64 channels, stride 1, each followed by 2x2 max pooling, a 1024-unit fully connected layer with
           dropout, and a softmax output; ReLU everywhere. "Same" padding gives the paper's 4.2M parameters
           on a 32x32 smallNORB input (4,253,349 with 2 channels and 5 classes).
cnn-small  the same blocks with 32 channels in the second convolution and a 23-unit hidden layer, no dropout:
           about the parameter count of the capsule `small` preset (62,791 for 1x28x28 and 10 classes, 74,511
           for 2x32x32 and 5; small has 68,444 and 68,754), so a comparison at equal size needs no other change.
           It flattens its features: global average pooling throws away where they are (docs/results.md).

Both return class probabilities (N, classes) that sum to 1 (a softmax), so the trainer, the evaluation and
`categorical_crossentropy` treat them like capsule activations; train them with that loss.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

CNN_PRESETS: dict[str, dict[str, float]] = {
    "cnn": {"channels2": 64, "hidden": 1024, "dropout": 0.5},
    "cnn-small": {"channels2": 32, "hidden": 23, "dropout": 0.0},
}


class BaselineCNN(nn.Module):
    """conv5x5(32) -> pool -> conv5x5(channels2) -> pool -> flatten -> fc(hidden) -> dropout -> fc.

    forward(images (N, C, S, S)) -> class probabilities (N, classes).
    """

    def __init__(
        self,
        *,
        num_classes: int,
        in_channels: int = 1,
        input_size: int = 32,
        channels2: int = 64,
        hidden: int = 1024,
        dropout: float = 0.5,
    ):
        super().__init__()
        if input_size < 4:
            raise ValueError(f"input size {input_size} is too small for the baseline CNN: use at least 4x4")
        self.in_channels, self.num_classes = in_channels, num_classes
        channels2, hidden = int(channels2), int(hidden)
        self.conv1 = nn.Conv2d(in_channels, 32, 5, padding=2)
        self.conv2 = nn.Conv2d(32, channels2, 5, padding=2)
        self.fc = nn.Linear(channels2 * (input_size // 4) ** 2, hidden)
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(hidden, num_classes)

    @classmethod
    def from_preset(cls, preset: str, **kwargs) -> "BaselineCNN":
        """Build "cnn" or "cnn-small"; kwargs as for __init__ (num_classes required)."""
        return cls(**CNN_PRESETS[preset], **kwargs)

    def health_stats(self) -> dict[str, dict[str, float]]:
        """No capsule layers: nothing to report (CapsNet reports per-layer routing statistics)."""
        return {}

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != self.in_channels:
            raise ValueError(f"BaselineCNN expects images (N, {self.in_channels}, H, W), got {tuple(images.shape)}")
        x = F.max_pool2d(F.relu(self.conv1(images)), 2)  # (N, 32, S/2, S/2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2).flatten(1)  # (N, channels2 * (S/4)^2)
        x = self.dropout(F.relu(self.fc(x)))  # (N, hidden)
        return torch.softmax(self.out(x).float(), dim=1)  # (N, classes)
