"""Loop-based float64 transcriptions of the margin family's formulas, one entry at a time.

Written from the papers' formulas as the cross-modal mapping states them (``C_ij = ⟨img_i, txt_j⟩``,
positives ``P(i) = {j : g_j = g_i}``, ``ℓ_i = ½[row_i + column_i]``), independently of
``mmsphere.losses.margins``: no matrices, no masks, every logit built by a Python loop from 0-d
tensors, so autograd through the reference gives the reference gradient. ``frozen=True`` writes
characteristic gradient detachment literally: ``ψ → C + sg[ψ − C]``; ``frozen=Offsets()`` records
every logit's ``ψ − C`` and, after :meth:`Offsets.replay`, adds them back as constants: the plain
cosine form whose gradient CGD must give.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

EPS = 1e-6  # the arccos clamp for float64 inputs


def theta(c: Tensor) -> Tensor:
    return torch.acos(torch.clamp(c, -1 + EPS, 1 - EPS))


def power_activation(x: Tensor, p: float) -> Tensor:
    return 2 * ((1 + x) / 2) ** p - 1


def _cosines(img: Tensor, txt: Tensor) -> list[list[Tensor]]:
    return [[(img[i] * txt[j]).sum() for j in range(len(txt))] for i in range(len(img))]


def _groups(groups: Tensor | None, size: int) -> list[int]:
    return list(range(size)) if groups is None else [int(g) for g in groups]


def _transpose(matrix: list[list[Tensor]]) -> list[list[Tensor]]:
    return [list(column) for column in zip(*matrix)]


class Offsets:
    """Each logit's ``ψ(C) − C`` recorded at one point, then replayed as constants in the same order."""

    def __init__(self) -> None:
        self.values: list[float] = []
        self.replaying = None

    def __call__(self, c: Tensor, psi: Tensor) -> Tensor:
        if self.replaying is None:
            self.values.append(float(psi - c))
            return psi
        return c + next(self.replaying)

    def replay(self) -> Offsets:
        self.replaying = iter(self.values)
        return self


def _freeze(c: Tensor, psi: Tensor, frozen) -> Tensor:
    if isinstance(frozen, Offsets):
        return frozen(c, psi)
    return c + (psi - c).detach() if frozen else psi


def softmax_family(img, txt, scale, positive, negative, groups=None, frozen=False, row_scales=None) -> Tensor:
    """Per-sample ``½[CE_P(row) + CE_P(column)]``; positive/negative map one cosine to ψ (before the scale)."""
    size = len(img)
    ids = _groups(groups, size)
    cosine = _cosines(img, txt)
    if row_scales is None:
        row_scales = ([torch.as_tensor(scale, dtype=img.dtype)] * size,) * 2
    per_sample = []
    for i in range(size):
        total = 0
        for matrix, scales in ((cosine, row_scales[0]), (_transpose(cosine), row_scales[1])):
            logits = []
            for j in range(size):
                c = matrix[i][j]
                psi = positive(c) if ids[i] == ids[j] else negative(c)
                logits.append(scales[i] * _freeze(c, psi, frozen))
            log_normaliser = torch.logsumexp(torch.stack(logits), dim=0)
            members = [j for j in range(size) if ids[j] == ids[i]]
            total = total - sum(logits[j] - log_normaliser for j in members) / len(members)
        per_sample.append(total / 2)
    return torch.stack(per_sample)


def cosface(img, txt, scale, margin, groups=None, frozen=False):
    return softmax_family(img, txt, scale, lambda c: c - margin, lambda c: c, groups, frozen)


def arcface(img, txt, scale, margin, fallback="insightface", groups=None, frozen=False):
    def positive(c):
        if theta(c) + margin > math.pi:
            return c - margin * math.sin(margin) if fallback == "insightface" else torch.cos(c * 0 + math.pi)
        return torch.cos(theta(c) + margin)

    return softmax_family(img, txt, scale, positive, lambda c: c, groups, frozen)


def sphereface_r(img, txt, scale, margin, version="v1", normalization="hard", groups=None, frozen=False,
                 norms=None, norm_weight=0.0, norm_target=1.0):
    def positive(c):
        if version == "v0":
            k = math.floor(float(margin * theta(c).detach()) / math.pi)
            return (-1) ** k * torch.cos(margin * theta(c)) - 2 * k
        if version == "v1":
            return torch.cos(torch.clamp(margin * theta(c), max=math.pi))
        return c

    def negative(c):
        return torch.cos(theta(c) / margin) if version == "v2" else c

    row_scales = None if normalization == "hard" else ([n for n in norms[0]], [n for n in norms[1]])
    per_sample = softmax_family(img, txt, scale, positive, negative, groups, frozen, row_scales)
    if normalization == "soft":
        per_sample = per_sample + torch.stack([
            norm_weight * (abs(norms[0][i] - norm_target) + abs(norms[1][i] - norm_target)) / 2
            for i in range(len(img))])
    return per_sample


def cam_softmax(img, txt, scale, c_angle, groups=None, frozen=False):
    p = 1 / (1 - math.log2(1 + math.cos(c_angle)))
    return softmax_family(img, txt, scale, lambda c: power_activation(c, p), lambda c: c, groups, frozen)


def sface(img, txt, scale, k, a, b, inter_reduction="sum", groups=None):
    size = len(img)
    ids = _groups(groups, size)
    cosine = _cosines(img, txt)
    per_sample = []
    for i in range(size):
        total = 0
        for matrix in (cosine, _transpose(cosine)):
            members = [j for j in range(size) if ids[j] == ids[i]]
            others = [j for j in range(size) if ids[j] != ids[i]]
            intra = -sum(torch.sigmoid(k * (theta(matrix[i][p]) - a)).detach() * scale * matrix[i][p]
                         for p in members) / len(members)
            inter = sum((torch.sigmoid(-k * (theta(matrix[i][n]) - b)).detach() * scale * matrix[i][n]
                         for n in others), torch.zeros((), dtype=img.dtype))
            if inter_reduction == "mean":
                inter = inter / max(len(others), 1)
            total = total + intra + inter
        per_sample.append(total / 2)
    return torch.stack(per_sample)


def sphereface2(img, txt, r, bias, lam, margin, t, variant="C", groups=None, frozen=False):
    size = len(img)
    ids = _groups(groups, size)
    cosine = _cosines(img, txt)
    r = torch.as_tensor(r, dtype=img.dtype)

    def psi(c, is_positive):
        if variant == "C":
            return power_activation(c, t) - margin if is_positive else power_activation(c, t) + margin
        if not is_positive:
            return power_activation(c, t)
        angle = theta(c) + margin if variant == "A" else theta(c) * margin
        return power_activation(torch.cos(torch.clamp(angle, max=math.pi)), t)

    per_sample = []
    for i in range(size):
        total = 0
        for matrix in (cosine, _transpose(cosine)):
            row = 0
            for j in range(size):
                c = matrix[i][j]
                is_positive = ids[i] == ids[j]
                z = r * _freeze(c, psi(c, is_positive), frozen) + bias
                if is_positive:
                    row = row + lam * torch.logaddexp(torch.zeros_like(z), -z)
                else:
                    row = row + (1 - lam) * torch.logaddexp(torch.zeros_like(z), z)
            total = total + row / r.detach()
        per_sample.append(total / 2)
    return torch.stack(per_sample)
