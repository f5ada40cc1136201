"""White-box adversarial attacks in pixel space: FGSM and BIM, untargeted and targeted.

Units. capsdist normalises its inputs in the data pipeline (per-image standardization, then smallNORB's centre
crop: `capsdist.data.transforms.normalise`), so a bound in model-input units would be a different bound in pixels
for every image. The attacks work on the pixels before normalisation, in [0, 1] (`eval_loader(...,
pixels_only=True)`), and call `forward(pixels)`, which normalises and runs the model. Epsilon bounds the change of
every pixel (L-infinity, in the units of a pixel in [0, 1]: eps = 8/255 is 8 grey levels), and every attacked pixel
stays in [0, 1]. For smallNORB the pixels are the 48x48 resized views whose centre 32x32 the model sees.

Loss. Capsule networks output class activations (independent logistic units in (0, 1)), the CNN baselines softmax
probabilities. The attacks use one loss for both: the cross-entropy of the scores normalised to sum 1,
-log(a_y / sum_k a_k) (for the CNNs exactly their training loss; the trainer's `categorical_crossentropy`). The
spread loss is not used: its margin depends on the training step, and a CNN was never trained with it. Scores are
clamped at the smallest normal float32, not at training's 1e-7, so that the gradient towards a target class the
model rates at 1e-12 is not cut off.

Steps. Untargeted: raise the loss of the true class, x <- x + alpha * sign(grad). Targeted: lower the loss of the
target class, x <- x - alpha * sign(grad). FGSM (Goodfellow et al. 2015) is one step of alpha = eps. BIM (Kurakin
et al. 2017) is `steps` steps of alpha = `step_size`, each followed by clipping to the eps-ball around the clean
pixels and to [0, 1]; no random start.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

Forward = Callable[[torch.Tensor], torch.Tensor]  # pixels (N, C, H, W) in [0, 1] -> class scores (N, K) in (0, 1)
BIM_STEPS = 10  # default BIM iterations
BIM_STEP_RATIO = 2.5  # default BIM step size: 2.5 * eps / steps (Madry et al. 2018): the steps can cross the ball
_TAG_TARGET = 0x544754


def attack_loss(scores: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of class scores (N, K) in (0, 1), normalised to sum 1, for classes (N,): a loss (N,) per image."""
    a = scores.float().clamp_min(torch.finfo(torch.float32).tiny)
    return torch.log(a.sum(dim=1)) - torch.log(a.gather(1, classes.unsqueeze(1))).squeeze(1)


def bim(
    forward: Forward,
    pixels: torch.Tensor,
    labels: torch.Tensor,
    eps: float,
    *,
    steps: int = BIM_STEPS,
    step_size: float | None = None,
    targets: torch.Tensor | None = None,
) -> torch.Tensor:
    """Basic iterative method: adversarial pixels (N, C, H, W) with |x' - x| <= eps everywhere and x' in [0, 1].

    pixels (N, C, H, W) in [0, 1], labels (N,). With `targets` (N,) the attack pushes each image towards its target
    class; otherwise away from its label. step_size defaults to BIM_STEP_RATIO * eps / steps. The model should be
    in eval mode (no dropout); its parameters get no gradient.
    """
    if not (eps >= 0 and steps >= 1):
        raise ValueError(f"eps {eps} must be >= 0 and steps {steps} >= 1")
    step_size = BIM_STEP_RATIO * eps / steps if step_size is None else step_size
    clean = pixels.detach()
    if eps == 0:
        return clean.clone()
    low, high = (clean - eps).clamp(0.0, 1.0), (clean + eps).clamp(0.0, 1.0)  # the eps-ball within [0, 1]
    direction, classes = (1.0, labels) if targets is None else (-1.0, targets)
    x = clean.clone()
    for _ in range(steps):
        x.requires_grad_(True)
        (grad,) = torch.autograd.grad(attack_loss(forward(x), classes).sum(), x)  # (N, C, H, W)
        x = torch.minimum(torch.maximum(x.detach() + direction * step_size * grad.sign(), low), high)
    return x


def fgsm(
    forward: Forward, pixels: torch.Tensor, labels: torch.Tensor, eps: float, *, targets: torch.Tensor | None = None
) -> torch.Tensor:
    """Fast gradient sign method: one step of size eps (BIM with one step); shapes and targets as for `bim`."""
    return bim(forward, pixels, labels, eps, steps=1, step_size=eps, targets=targets)


def target_classes(labels: torch.Tensor, index: torch.Tensor, num_classes: int, seed: int = 0) -> torch.Tensor:
    """A wrong class (N,) for each image of labels (N,): (label + offset) mod K with the offset uniform in 1..K-1,
    drawn from (seed, the image's sample index), so every model is attacked towards the same targets."""
    offsets = [int(np.random.default_rng([seed, int(i), _TAG_TARGET]).integers(1, num_classes)) for i in index]
    return (labels + torch.tensor(offsets, dtype=labels.dtype, device=labels.device)) % num_classes
