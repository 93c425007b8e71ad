"""Retrieval evaluation: metrics with the DESIGN §4 tie rule, geometry diagnostics, the library entry."""

from mmsphere.eval.encode import EncodedEvalSet, encode_eval_set, encode_texts
from mmsphere.eval.evaluate import evaluate_retrieval, evaluate_retrieval_loader, save_similarity, score_retrieval
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
    "EncodedEvalSet",
    "chunked_uniformity",
    "dual_softmax",
    "encode_eval_set",
    "encode_texts",
    "evaluate_retrieval",
    "evaluate_retrieval_loader",
    "geometry_diagnostics",
    "metrics_from_ranks",
    "retrieval_metrics",
    "retrieval_ranks",
    "save_similarity",
    "score_retrieval",
    "topk_search",
]
