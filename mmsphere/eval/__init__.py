"""Retrieval evaluation: metrics, geometry, benchmark protocols, the library entries.

Ties count against the query (ARCHITECTURE.md, Evaluation conventions).
"""

from mmsphere.eval.benchmark import EvaluationSet, evaluate_set, list_set, protocol_set
from mmsphere.eval.completeness import IncompleteDataError, MissingItem, media_fingerprint
from mmsphere.eval.encode import EncodedEvalSet, encode_eval_set, encode_texts
from mmsphere.eval.evaluate import evaluate_retrieval, evaluate_retrieval_loader, save_similarity, score_retrieval
from mmsphere.eval.geometry import GEOMETRY_KEYS, chunked_uniformity, geometry_diagnostics
from mmsphere.eval.protocols import PROTOCOLS, RetrievalProtocol, get_protocol, register_protocol
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
    "PROTOCOLS",
    "TIE_RULE",
    "EncodedEvalSet",
    "EvaluationSet",
    "IncompleteDataError",
    "MissingItem",
    "RetrievalProtocol",
    "chunked_uniformity",
    "dual_softmax",
    "encode_eval_set",
    "encode_texts",
    "evaluate_retrieval",
    "evaluate_retrieval_loader",
    "evaluate_set",
    "get_protocol",
    "list_set",
    "media_fingerprint",
    "protocol_set",
    "register_protocol",
    "geometry_diagnostics",
    "metrics_from_ranks",
    "retrieval_metrics",
    "retrieval_ranks",
    "save_similarity",
    "score_retrieval",
    "topk_search",
]
