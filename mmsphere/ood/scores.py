"""Zero-shot OoD scores of a dual encoder: pure functions on features and logits, and their registry.

Convention (ARCHITECTURE.md, Evaluation conventions): higher score = more in-distribution. The
temperature is always an explicit argument, because it changes the ranking of softmax-based scores:
MCM's point is that ``T = 1`` on raw cosines separates ID from OoD far better than CLIP's own
``T = 1/100``.

Every score is one :class:`OodScore` in :data:`OOD_SCORES`: how it scores, the temperature its paper
uses, and what it needs besides the image and class features (NegLabel: the text features of
negative labels). Callers look a score up by name and never special-case one; yours is one
:func:`register_ood_score` call (in a module given to ``--imports``)::

    from mmsphere.ood.scores import OodScore, on_logits, register_ood_score

    register_ood_score(OodScore("gen", on_logits(my_gen_score), temperature=None, paper="GEN, CVPR 2023"))
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import torch

from mmsphere.eval.geometry import checked_features
from mmsphere.registry import Registry

Features = torch.Tensor | np.ndarray
# (image_features [N, D], class_features [K, D], *, temperature, **needed inputs) -> scores [N], higher = more ID
ScoreFunction = Callable[..., torch.Tensor]

# what a score may need besides the image and class features, and how a user supplies it
NEEDS: dict[str, str] = {
    "negative_features": "negative labels",  # NegLabel: text features of words far from the ID classes
}


@dataclass(frozen=True)
class OodScore:
    """One OoD score: its function, its paper's temperature (None: 1 / the model's logit scale), its extra inputs."""

    name: str
    function: ScoreFunction  # (image_features, class_features, *, temperature, **needs) -> [N]
    temperature: float | None
    needs: tuple[str, ...] = ()  # keys of NEEDS, passed to ``function`` as keyword arguments
    paper: str = ""

    def __post_init__(self) -> None:
        unknown = [need for need in self.needs if need not in NEEDS]
        if unknown:
            raise ValueError(f"OoD score {self.name!r}: needs {unknown} must be among {sorted(NEEDS)}")
        if self.temperature is not None and not self.temperature > 0:
            raise ValueError(f"OoD score {self.name!r}: temperature={self.temperature} must be > 0 or None")


OOD_SCORES: Registry[OodScore] = Registry("score", OodScore,
                                          unknown="{kind} {name!r} is unknown; choose one of {known}")


def register_ood_score(score: OodScore) -> OodScore:
    """Make ``score`` available as ``score-ood --score <score.name>``, to :func:`evaluate_ood` and the ablation."""
    return OOD_SCORES.register(score.name, score)


def on_logits(function: Callable[[torch.Tensor], torch.Tensor]) -> ScoreFunction:
    """A score of the zero-shot logits ``cos / T`` (``[N, K] → [N]``) as a registry function."""
    def score(image_features: Features, class_features: Features, *, temperature: float) -> torch.Tensor:
        return function(cosine_logits(image_features, class_features, temperature))
    score.__name__ = getattr(function, "__name__", "score")
    score.__doc__ = function.__doc__
    return score


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


def ood_score(name: str, image_features: Features, class_features: Features, *, temperature: float,
              negative_features: Features | None = None) -> torch.Tensor:
    """Score ``[N]`` images with the registered score ``name``; logits are ``cos / temperature`` for every score."""
    score = OOD_SCORES.lookup(name)
    given = {"negative_features": negative_features}
    needed = {}
    for need, value in given.items():
        if need in score.needs and value is None:
            raise ValueError(f"the {name} score needs {NEEDS[need].removesuffix('s')} features")
        if need not in score.needs and value is not None:
            raise ValueError(f"{NEEDS[need]} are only used by the {scores_needing(need)} score, not by {name!r}")
        if need in score.needs:
            needed[need] = value
    return score.function(image_features, class_features, temperature=temperature, **needed)


def scores_needing(need: str) -> str:
    """The registered scores that take ``need``, in words (for the error that says where it goes)."""
    return " or ".join(name for name, score in OOD_SCORES.items() if need in score.needs) or "(no)"


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


# --------------------------------------------------------------------------------------------
# the shipped scores; temperatures from the papers, None = the model's own zero-shot classifier

register_ood_score(OodScore("mcm", on_logits(msp_score), temperature=1.0, paper="MCM (Ming et al., NeurIPS 2022)"))
register_ood_score(OodScore("msp", on_logits(msp_score), temperature=None, paper="MSP (Hendrycks & Gimpel, ICLR 2017)"))
register_ood_score(OodScore("maxlogit", on_logits(maxlogit_score), temperature=None,
                            paper="MaxLogit (Hendrycks et al., ICML 2022)"))
register_ood_score(OodScore("energy", on_logits(energy_score), temperature=None,
                            paper="Energy (Liu et al., NeurIPS 2020)"))
register_ood_score(OodScore("neglabel", neglabel_score, temperature=0.01, needs=("negative_features",),
                            paper="NegLabel (Jiang et al., ICLR 2024)"))


class _Temperatures(Mapping[str, "float | None"]):
    """Score name -> its own temperature, read from the registry (the public name before the registry)."""

    def __getitem__(self, name: str) -> float | None:
        return OOD_SCORES[name].temperature

    def __iter__(self) -> Iterator[str]:
        return iter(OOD_SCORES)

    def __len__(self) -> int:
        return len(OOD_SCORES)


# the names before the registry, kept for one release; both follow registrations
SCORES = OOD_SCORES
DEFAULT_TEMPERATURE: Mapping[str, float | None] = _Temperatures()
