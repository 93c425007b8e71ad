"""Out-of-distribution detection with a dual encoder: registered zero-shot scores, their metrics, the library entry."""

from mmsphere.ood.evaluate import OodEvaluation, SetScores, default_temperature, evaluate_ood
from mmsphere.ood.metrics import CONVENTIONS, METRIC_KEYS, mean_metrics, ood_metrics, roc_curve
from mmsphere.ood.protocols import OOD_PROTOCOLS, OodProtocol, OodSetSpec, register_ood_protocol, resolve_suite
from mmsphere.ood.scores import (
    DEFAULT_TEMPERATURE,
    OOD_SCORES,
    SCORES,
    OodScore,
    cosine_logits,
    energy_score,
    maxlogit_score,
    mcm_score,
    msp_score,
    neglabel_score,
    on_logits,
    ood_score,
    register_ood_score,
)

__all__ = [
    "CONVENTIONS",
    "DEFAULT_TEMPERATURE",
    "METRIC_KEYS",
    "OOD_PROTOCOLS",
    "OOD_SCORES",
    "OodEvaluation",
    "OodProtocol",
    "OodScore",
    "OodSetSpec",
    "SCORES",
    "SetScores",
    "cosine_logits",
    "default_temperature",
    "energy_score",
    "evaluate_ood",
    "maxlogit_score",
    "mcm_score",
    "mean_metrics",
    "msp_score",
    "neglabel_score",
    "ood_metrics",
    "on_logits",
    "ood_score",
    "register_ood_protocol",
    "register_ood_score",
    "resolve_suite",
    "roc_curve",
]
