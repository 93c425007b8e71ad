"""Zero-shot OoD scores of a dual encoder: pure functions on features and logits.

Convention (DESIGN §4): higher score = more in-distribution. The temperature is always an
explicit argument, because it changes the ranking of softmax-based scores: MCM's point is that
``T = 1`` on raw cosines separates ID from OoD far better than CLIP's own ``T = 1/100``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from mmsphere.eval.geometry import checked_features

SCORES = ("mcm", "msp", "maxlogit", "energy", "neglabel")
# temperatures from the papers; None = 1 / the model's own logit scale (its zero-shot classifier)
DEFAULT_TEMPERATURE: dict[str, float | None] = {
    "mcm": 1.0,
    "neglabel": 0.01,
    "msp": None,
    "maxlogit": None,
    "energy": None,
}


def cosine_logits(image_features: torch.Tensor | np.ndarray, class_features: torch.Tensor | np.ndarray,
                  temperature: float) -> torch.Tensor:
    """Zero-shot logits ``cos(image, class) / T``: ``[N, D] × [K, D] → [N, K]`` in fp64."""
    images = checked_features(image_features, "image_features").double()
    classes = checked_features(class_features, "class_features").double()
    if images.shape[1] != classes.shape[1]:
        raise ValueError(
            f"image_features are {images.shape[1]}-dimensional but class_features are {classes.shape[1]}-dimensional"
        )
    _check_temperature(temperature)
    return images @ classes.T / temperature


def msp_score(logits: torch.Tensor) -> torch.Tensor:
    """Maximum softmax probability (Hendrycks & Gimpel, ICLR 2017): ``[N, K] → [N]``."""
    return torch.softmax(_checked_logits(logits), dim=1).amax(dim=1)


def maxlogit_score(logits: torch.Tensor) -> torch.Tensor:
    """Maximum logit (Hendrycks et al., ICML 2022): ``[N, K] → [N]``."""
    return _checked_logits(logits).amax(dim=1)


def energy_score(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Negative free energy ``T·logsumexp(logits / T)`` (Liu et al., NeurIPS 2020): ``[N, K] → [N]``."""
    _check_temperature(temperature)
    return temperature * torch.logsumexp(_checked_logits(logits) / temperature, dim=1)


def mcm_score(image_features: torch.Tensor | np.ndarray, class_features: torch.Tensor | np.ndarray,
              temperature: float = 1.0) -> torch.Tensor:
    """Maximum concept matching ``max_k softmax(cos(x, c_k) / T)`` (MCM; Ming et al., NeurIPS 2022)."""
    return msp_score(cosine_logits(image_features, class_features, temperature))


def neglabel_score(image_features: torch.Tensor | np.ndarray, class_features: torch.Tensor | np.ndarray,
                   negative_features: torch.Tensor | np.ndarray, temperature: float = 0.01) -> torch.Tensor:
    """NegLabel (Jiang et al., ICLR 2024): softmax mass of the ID labels against ID + negative labels.

    ``Σ_i exp(cos(x, y_i)/T) / (Σ_i exp(cos(x, y_i)/T) + Σ_j exp(cos(x, ỹ_j)/T))`` with ``y`` the ID
    class features and ``ỹ`` the user-given negative labels (the paper's grouping is not applied).
    """
    id_logits = cosine_logits(image_features, class_features, temperature)
    negative_logits = cosine_logits(image_features, negative_features, temperature)
    all_logits = torch.cat([id_logits, negative_logits], dim=1)
    return torch.exp(torch.logsumexp(id_logits, dim=1) - torch.logsumexp(all_logits, dim=1))


def ood_score(name: str, image_features: torch.Tensor | np.ndarray, class_features: torch.Tensor | np.ndarray,
              *, temperature: float, negative_features: torch.Tensor | np.ndarray | None = None) -> torch.Tensor:
    """Score ``[N]`` images with the named score; logits are ``cos / temperature`` for every score."""
    if name not in SCORES:
        raise ValueError(f"score {name!r} is unknown; choose one of {', '.join(SCORES)}")
    if name == "neglabel":
        if negative_features is None:
            raise ValueError("the neglabel score needs negative label features (--neg-labels FILE)")
        return neglabel_score(image_features, class_features, negative_features, temperature)
    if negative_features is not None:
        raise ValueError(f"negative labels are only used by the neglabel score, not by {name!r}")
    logits = cosine_logits(image_features, class_features, temperature)
    on_logits: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "mcm": msp_score,
        "msp": msp_score,
        "maxlogit": maxlogit_score,
        "energy": energy_score,
    }
    return on_logits[name](logits)


def _checked_logits(logits: torch.Tensor) -> torch.Tensor:
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2 or logits.shape[1] == 0:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"logits must be a [N, K] tensor with K >= 1, got {shape}")
    if not torch.isfinite(logits).all():
        raise ValueError("logits hold non-finite values")
    return logits.double()


def _check_temperature(temperature: float) -> None:
    if not (isinstance(temperature, (int, float)) and temperature > 0 and np.isfinite(temperature)):
        raise ValueError(f"temperature={temperature!r} must be a finite number > 0")
