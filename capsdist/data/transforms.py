"""Per-sample transforms: stored uint8 views (V, H, W) -> float32 model input (C, h, w).

smallNORB (the paper and the TensorFlow implementation): views (2, 96, 96) -> both or only the left view ->
bilinear resize to 48x48 -> per-image standardization -> training: random 32x32 crop, random brightness (delta
uniform in [-0.4, 0.4]), random contrast (factor uniform in [0, 3], around each channel's mean, like
tf.image.random_contrast(0, 3)); evaluation: centre 32x32 crop. Output (2 or 1, 32, 32).
MNIST-likes: (1, 28, 28) -> training with pad_crop N: zero-pad by N, random 28x28 crop ->
per-image standardization. Output (1, 28, 28).

Evaluation is two steps, so that an attack can bound its perturbation in pixel units:
`pixels` (uint8 views -> float32 pixels in [0, 1] in the model's geometry: smallNORB (C, 48, 48) after the
resize, MNIST-likes (1, 28, 28)) and `normalise` (pixels -> model input, batched or not, differentiable:
per-image standardization, then smallNORB's centre crop).

Randomness is a pure function of (seed, epoch, sample index), never of worker or time, so a
resumed or re-sharded epoch augments every sample exactly as before.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torchvision.transforms.v2 import functional as TF

from capsdist.core.errors import ConfigError

NORB_RESIZE, NORB_CROP = 48, 32
MAX_BRIGHTNESS_DELTA = 0.4
CONTRAST_RANGE = (0.0, 3.0)
_TAG_AUGMENT = 0x415547
CHANNELS = ("both", "left")  # smallNORB: both stereo views as channels, or the left one


def input_shape(dataset: str, image_shape, channels: str, *, pixels_only: bool = False) -> tuple[int, int, int]:
    """(C, H, W) of the model input for samples of `dataset` stored as image_shape (views, H, W); with
    pixels_only, of `pixels` (smallNORB: 48x48, before the centre crop)."""
    if channels not in CHANNELS:
        raise ConfigError(f"channels {channels!r}: expected {' or '.join(CHANNELS)}")
    if dataset == "smallnorb":
        size = NORB_RESIZE if pixels_only else NORB_CROP
        return (1 if channels == "left" else 2, size, size)
    return tuple(image_shape)


def standardize(x: torch.Tensor) -> torch.Tensor:
    """Per-image standardization (tf.image.per_image_standardization): each image (..., C, H, W) over its C, H, W."""
    dims, count = (-3, -2, -1), x.shape[-3:].numel()
    mean = x.mean(dim=dims, keepdim=True)
    return (x - mean) / x.std(dim=dims, correction=0, keepdim=True).clamp_min(1.0 / count**0.5)


def pixels(dataset: str, views: np.ndarray, channels: str) -> torch.Tensor:
    """uint8 views (V, H, W) -> float32 pixels in [0, 1], (C, 48, 48) for smallNORB (chosen views, resized)."""
    if dataset != "smallnorb":
        return torch.from_numpy(views).float().div_(255)  # (1, 28, 28)
    x = torch.from_numpy(views[:1] if channels == "left" else views).float().div_(255)
    # bilinear without antialiasing, as tf.image.resize in the TensorFlow implementation: for 96 -> 48 a 2x2 average
    return TF.resize(x, [NORB_RESIZE, NORB_RESIZE], antialias=False)  # (C, 48, 48)


def normalise(dataset: str, x: torch.Tensor) -> torch.Tensor:
    """Evaluation pixels (..., C, H, W) in [0, 1] -> model input: standardized per image, smallNORB centre-cropped
    to 32x32. Differentiable, so gradients reach the pixels."""
    x = standardize(x)
    return TF.center_crop(x, [NORB_CROP, NORB_CROP]) if dataset == "smallnorb" else x


@dataclass(frozen=True)
class SampleTransform:
    """The transform of one epoch of training (train=True) or of evaluation; picklable for any worker start method."""

    dataset: str
    train: bool
    augment: bool
    channels: str
    pad_crop: int
    seed: int
    epoch: int
    pixels_only: bool = False  # evaluation: return `pixels` (in [0, 1]), leaving `normalise` to the caller

    def __call__(self, views: np.ndarray, index: int) -> torch.Tensor:
        """uint8 (V, H, W) of sample `index` -> float32 (C, h, w)."""
        if not (self.train and self.augment):
            x = pixels(self.dataset, views, self.channels)
            return x if self.pixels_only else normalise(self.dataset, x)
        return self._norb(views, index) if self.dataset == "smallnorb" else self._mnist(views, index)

    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, index, _TAG_AUGMENT])

    def _norb(self, views: np.ndarray, index: int) -> torch.Tensor:
        x = standardize(pixels(self.dataset, views, self.channels))  # (C, 48, 48)
        g = self._rng(index)
        top, left = g.integers(0, NORB_RESIZE - NORB_CROP + 1, size=2)
        x = TF.crop(x, int(top), int(left), NORB_CROP, NORB_CROP)  # (C, 32, 32)
        x = x + g.uniform(-MAX_BRIGHTNESS_DELTA, MAX_BRIGHTNESS_DELTA)
        mean = x.mean(dim=(-2, -1), keepdim=True)
        return (x - mean) * g.uniform(*CONTRAST_RANGE) + mean

    def _mnist(self, views: np.ndarray, index: int) -> torch.Tensor:
        x = pixels(self.dataset, views, self.channels)  # (1, 28, 28)
        if self.pad_crop > 0:
            top, left = self._rng(index).integers(0, 2 * self.pad_crop + 1, size=2)
            x = TF.crop(TF.pad(x, [self.pad_crop]), int(top), int(left), x.shape[-2], x.shape[-1])
        return standardize(x)
