"""Retrieval evaluation: metrics with the DESIGN §4 tie rule, geometry diagnostics, the library entry."""

from mmsphere.eval.geometry import GEOMETRY_KEYS, chunked_uniformity, geometry_diagnostics
from mmsphere.eval.retrieval import (
    TIE_RULE,
    dual_softmax,
    metrics_from_ranks,
    retrieval_metrics,
    retrieval_ranks,
    topk_search,
)

__all__ = [
    "GEOMETRY_KEYS",
    "TIE_RULE",
    "chunked_uniformity",
    "dual_softmax",
    "evaluate_retrieval",
    "geometry_diagnostics",
    "metrics_from_ranks",
    "retrieval_metrics",
    "retrieval_ranks",
    "topk_search",
]


def __getattr__(name: str):
    # the library entry pulls in the model and data stacks; import it only when asked for
    if name == "evaluate_retrieval":
        from mmsphere.eval.evaluate import evaluate_retrieval

        return evaluate_retrieval
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
