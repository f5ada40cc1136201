"""A slow, plainly written reference of EM routing and of the capsule layers' votes, to check the fast path.

It follows the maths in the docstring of capsdist/model/routing.py step by step, with none of the fast
path's tricks: no vote centring, no [V, V^2] moment products; the variance is the direct weighted mean of
(V - mu)^2, the E-step uses (V - mu)^2 / sigma_sq directly, and the conv layers' fix-1 normalisation is a
Python loop over every child and every window that holds it. Votes are explicit 4x4 matrix products M @ W
in loops over positions and kernel offsets. Shapes must be tiny.

Notation as in routing.py: V votes (N', O, I, P), a_in (N', I), R (N', O, I), mu and sigma_sq (N', O, P),
a_out (N', O), beta_u and beta_a (O,).
"""

from __future__ import annotations

import math

import torch

P = 16
DATA_SCALE = 100.0  # routing.py's pitfall 2 constant, written out again on purpose


def inverse_temperature(t: int, final_lambda: float) -> float:
    """lambda of iteration t (0-based): final_lambda * (1 - 0.95^(t+1))."""
    return final_lambda * (1.0 - 0.95 ** (t + 1))


def m_step(R, a_in, V, beta_u, beta_a, lam, scale, variance_floor, mu_prev, alpha):
    """One M-step. R (N', O, I), a_in (N', I), V (N', O, I, P) -> mu, sigma_sq (N', O, P), a_out (N', O)."""
    Ra = R * a_in[:, None, :] * scale  # (N', O, I), pitfall 2 data scale
    sum_Ra = Ra.sum(dim=2)  # (N', O)
    mu = (Ra[..., None] * V).sum(dim=2) / sum_Ra[..., None].clamp_min(1e-10)  # (N', O, P)
    if mu_prev is not None:
        mu = (1.0 - alpha) * mu + alpha * mu_prev  # moving average of poses across iterations
    diff_sq = (V - mu[:, :, None, :]) ** 2  # (N', O, I, P)
    sigma_sq = (Ra[..., None] * diff_sq).sum(dim=2) / sum_Ra[..., None].clamp_min(1e-10) + variance_floor  # pitfall 1
    log_sigma = 0.5 * torch.log(sigma_sq)
    cost = (beta_u[:, None] + log_sigma) * sum_Ra[..., None]  # (N', O, P)
    a_out = torch.sigmoid(lam * (beta_a - cost.sum(dim=-1)))  # (N', O)
    return mu, sigma_sq, a_out


def e_step_logits(V, mu, sigma_sq, a_out, estep_temperature=1.0):
    """log p_ij / T + log a_j, before normalisation (T = 1 in the paper). -> (N', O, I)."""
    diff_sq = (V - mu[:, :, None, :]) ** 2  # (N', O, I, P)
    log_p = (
        -(diff_sq / (2.0 * sigma_sq[:, :, None, :])).sum(dim=-1)
        - 0.5 * torch.log(sigma_sq).sum(dim=-1)[..., None]
        - 0.5 * P * math.log(2.0 * math.pi)
    )
    return log_p / estep_temperature + torch.log(a_out)[..., None]


def reference_route(
    V,
    a_in,
    beta_u,
    beta_a,
    R0,
    normalise,
    *,
    iterations,
    final_lambda=0.01,
    alpha=0.0,
    variance_floor=1e-4,
    estep_temperature=1.0,
):
    """Procedure 1 in the internal layout. R0 (N', O, I) initial assignments (probabilities, not logs);
    normalise maps E-step logits (N', O, I) to R. Returns poses (N', O, P), a_out (N', O), R of the last M-step."""
    n, O, I, _ = V.shape
    scale = DATA_SCALE * O / I
    R = R0
    mu = None
    for t in range(iterations):
        lam = inverse_temperature(t, final_lambda)
        mu, sigma_sq, a_out = m_step(
            R,
            a_in,
            V,
            beta_u,
            beta_a,
            lam,
            scale,
            variance_floor,
            mu if (mu is not None and alpha != 0.0) else None,
            alpha,
        )
        if t == iterations - 1:
            break
        R = normalise(e_step_logits(V, mu, sigma_sq, a_out, estep_temperature))
    return mu, a_out, R


def softmax_over_parents(logits):
    """Fully connected E-step: R_ij = exp(logit_ij) / sum_j exp(logit_ij)."""
    return torch.softmax(logits, dim=1)


def reference_em_routing(
    votes, a_in, beta_u, beta_a, *, iterations, final_lambda=0.01, alpha=0.0, variance_floor=1e-4, estep_temperature=1.0
):
    """Fully connected routing, public layout: votes (N, I, O, P) -> poses (N, O, P), a_out (N, O)."""
    n, I, O, _ = votes.shape
    V = votes.transpose(1, 2)  # (N, O, I, P)
    R0 = torch.full((n, O, I), 1.0 / O, dtype=votes.dtype)
    poses, a_out, _ = reference_route(
        V,
        a_in,
        beta_u,
        beta_a,
        R0,
        softmax_over_parents,
        iterations=iterations,
        final_lambda=final_lambda,
        alpha=alpha,
        variance_floor=variance_floor,
        estep_temperature=estep_temperature,
    )
    return poses, a_out


# ----------------------------------------------------------------------------------------------- ConvCaps


def conv_geometry(h, w, kernel, stride):
    """Parent grid (H', W') and, for each child (row, col), the list of (parent position l, kernel position k)
    windows that hold it. l = y * W' + x (row-major), k = kh * K + kw."""
    ho, wo = (h - kernel) // stride + 1, (w - kernel) // stride + 1
    windows = {(r, c): [] for r in range(h) for c in range(w)}
    for y in range(ho):
        for x in range(wo):
            for kh in range(kernel):
                for kw in range(kernel):
                    windows[(y * stride + kh, x * stride + kw)].append((y * wo + x, kh * kernel + kw))
    return ho, wo, windows


def reference_conv_votes(poses, weight, kernel, stride):
    """poses (N, T, 16, H, W), weight (K*K, T, O, 4, 4) -> V (N * L, O, K*K * T, 16), children ordered
    (kernel position, type), problems ordered (image, parent row, parent column). Explicit M @ W per vote."""
    n, t, _, h, w = poses.shape
    o = weight.shape[2]
    ho, wo, _ = conv_geometry(h, w, kernel, stride)
    problems = []
    for b in range(n):
        for y in range(ho):
            for x in range(wo):
                parents = []
                for j in range(o):
                    children = []
                    for kh in range(kernel):
                        for kw in range(kernel):
                            for ti in range(t):
                                M = poses[b, ti, :, y * stride + kh, x * stride + kw].reshape(4, 4)
                                children.append((M @ weight[kh * kernel + kw, ti, j]).reshape(P))
                    parents.append(torch.stack(children))  # (I, P)
                problems.append(torch.stack(parents))  # (O, I, P)
    return torch.stack(problems)  # (N * L, O, I, P)


def reference_conv_caps(
    poses,
    activations,
    weight,
    beta_u,
    beta_a,
    *,
    kernel,
    stride,
    iterations,
    final_lambda=0.01,
    alpha=0.0,
    variance_floor=1e-4,
    estep_temperature=1.0,
):
    """ConvCaps forward: poses (N, T, 16, H, W), activations (N, T, H, W) ->
    poses (N, O, 16, H', W'), activations (N, O, H', W'), R (N * L, O, I) of the last M-step.

    Pitfall 3: a child's assignments sum to 1 over every parent of every window that holds it, initially uniform
    over that set: R0 = 1 / (O * number of windows)."""
    n, t, _, h, w = poses.shape
    o = weight.shape[2]
    ho, wo, windows = conv_geometry(h, w, kernel, stride)
    L, I = ho * wo, kernel * kernel * t
    V = reference_conv_votes(poses, weight, kernel, stride)  # (N * L, O, I, P)

    # child activations per routing problem, and the (problem, column) entries of each child
    entries = {}  # (image, type, row, col) -> list of (problem index, child index within the problem)
    for b in range(n):
        for (r, c), wins in windows.items():
            for ti in range(t):
                entries[(b, ti, r, c)] = [(b * L + l, k * t + ti) for (l, k) in wins]
    a_flat = [None] * (n * L * I)
    R0 = torch.zeros(n * L, o, I, dtype=poses.dtype)
    for (b, ti, r, c), ents in entries.items():
        for row, col in ents:
            a_flat[row * I + col] = activations[b, ti, r, c]
            R0[row, :, col] = 1.0 / (o * len(ents))
    a_in = torch.stack(a_flat).view(n * L, I)

    def normalise(logits):
        """R = exp(logit) / sum of exp(logit) over all parents in all windows that hold the child."""
        log_z = [None] * (n * L * I)
        for ents in entries.values():
            if not ents:
                continue
            vals = torch.cat([logits[row, :, col] for (row, col) in ents])  # every parent, every window
            lz = torch.logsumexp(vals, dim=0)
            for row, col in ents:
                log_z[row * I + col] = lz
        log_z = torch.stack(log_z).view(n * L, 1, I)
        return torch.exp(logits - log_z)

    mu, a_out, R = reference_route(
        V,
        a_in,
        beta_u,
        beta_a,
        R0,
        normalise,
        iterations=iterations,
        final_lambda=final_lambda,
        alpha=alpha,
        variance_floor=variance_floor,
        estep_temperature=estep_temperature,
    )
    poses_out = mu.view(n, ho, wo, o, P).permute(0, 3, 4, 1, 2)
    a_out = a_out.view(n, ho, wo, o).permute(0, 3, 1, 2)
    return poses_out, a_out, R


# ---------------------------------------------------------------------------------------------- ClassCaps


def reference_class_votes(poses, weight, *, coord_add, centre_scale=(1.0, 0.5), input_size=1):
    """poses (N, T, 16, H, W), weight (T, O, 4, 4) -> V (N, O, H*W*T, 16), children ordered (row, col, type).
    Coordinate addition: child (r, c) gets (a * r + b) / input_size added to flat entry 3 (pose row 0,
    column 3) and (a * c + b) / input_size to flat entry 7 (pose row 1, column 3)."""
    n, t, _, h, w = poses.shape
    o = weight.shape[1]
    a, b = centre_scale
    images = []
    for bi in range(n):
        parents = []
        for j in range(o):
            children = []
            for r in range(h):
                for c in range(w):
                    for ti in range(t):
                        v = (poses[bi, ti, :, r, c].reshape(4, 4) @ weight[ti, j]).reshape(P)
                        if coord_add:
                            offset = torch.zeros(P, dtype=v.dtype)
                            offset[3] = (a * r + b) / input_size
                            offset[7] = (a * c + b) / input_size
                            v = v + offset
                        children.append(v)
            parents.append(torch.stack(children))
        images.append(torch.stack(parents))
    return torch.stack(images)


def reference_class_caps(
    poses,
    activations,
    weight,
    beta_u,
    beta_a,
    *,
    coord_add,
    centre_scale=(1.0, 0.5),
    input_size=1,
    iterations,
    final_lambda=0.01,
    alpha=0.0,
    variance_floor=1e-4,
    estep_temperature=1.0,
):
    """ClassCaps forward: -> class poses (N, O, 16), class activations (N, O), R (N, O, I)."""
    n, t, _, h, w = poses.shape
    o = weight.shape[1]
    V = reference_class_votes(poses, weight, coord_add=coord_add, centre_scale=centre_scale, input_size=input_size)
    a_in = activations.permute(0, 2, 3, 1).reshape(n, h * w * t)  # (row, col, type)
    R0 = torch.full((n, o, h * w * t), 1.0 / o, dtype=poses.dtype)
    return reference_route(
        V,
        a_in,
        beta_u,
        beta_a,
        R0,
        softmax_over_parents,
        iterations=iterations,
        final_lambda=final_lambda,
        alpha=alpha,
        variance_floor=variance_floor,
        estep_temperature=estep_temperature,
    )
