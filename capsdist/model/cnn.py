"""The CNN baselines that capsule figures are compared with, trained by the same trainer, data and schedule.

cnn        the paper's baseline (Hinton, Sabour, Frosst 2018, section 5): two 5x5 convolutions with 32 and
           64 channels, stride 1, each followed by 2x2 max pooling, a 1024-unit fully connected layer with
           dropout, and a softmax output; ReLU everywhere. "Same" padding gives the paper's 4.2M parameters
           on a 32x32 smallNORB input (4,245,509 with 2 channels and 5 classes).
cnn-small  the same two convolution blocks, then global average pooling and a 192-unit hidden layer: about
           the parameter count of the capsule `small` preset (66,506 for 1x28x28 and 10 classes; small has
           68K), so a comparison at equal size needs no other change.

Both return class probabilities (N, classes) that sum to 1 (a softmax), so the trainer, the evaluation and
`categorical_crossentropy` treat them like capsule activations; train them with that loss.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

CNN_PRESETS: dict[str, dict[str, int]] = {
    "cnn": {"hidden": 1024, "global_pool": 0},
    "cnn-small": {"hidden": 192, "global_pool": 1},
}


class BaselineCNN(nn.Module):
    """conv5x5(32) -> pool -> conv5x5(64) -> pool -> [global average pool] -> fc(hidden) -> dropout -> fc.

    forward(images (N, C, S, S)) -> class probabilities (N, classes).
    """

    def __init__(self, *, num_classes: int, in_channels: int = 1, input_size: int = 32, hidden: int = 1024,
                 global_pool: bool = False, dropout: float = 0.5):
        super().__init__()
        if input_size < 4:
            raise ValueError(f"input size {input_size} is too small for the baseline CNN: use at least 4x4")
        self.in_channels, self.num_classes, self.global_pool = in_channels, num_classes, bool(global_pool)
        self.conv1 = nn.Conv2d(in_channels, 32, 5, padding=2)
        self.conv2 = nn.Conv2d(32, 64, 5, padding=2)
        features = 64 if self.global_pool else 64 * (input_size // 4) ** 2
        self.fc = nn.Linear(features, hidden)
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
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # (N, 64, S/4, S/4)
        x = x.mean(dim=(2, 3)) if self.global_pool else x.flatten(1)  # (N, 64) or (N, 64 * (S/4)^2)
        x = self.dropout(F.relu(self.fc(x)))  # (N, hidden)
        return torch.softmax(self.out(x).float(), dim=1)  # (N, classes)
