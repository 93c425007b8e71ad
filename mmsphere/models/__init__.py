"""The dual encoder: open_clip towers + a temporal head, built from a :class:`~mmsphere.config.ModelConfig`."""

from mmsphere.models.dual_encoder import DualEncoder
from mmsphere.models.export import export_run, load_temporal_head
from mmsphere.models.factory import (create_model, create_run_model, load_weights, register_model_configs,
                                     resolve_architecture)
from mmsphere.digest import file_sha256
from mmsphere.models.run_dir import load_dual_encoder, load_run, save_run
from mmsphere.models.temporal import (TEMPORAL_HEADS, MeanTemporalHead, TemporalHead, TransformerTemporalHead,
                                      build_temporal_head, masked_mean, register_temporal_head)

register_model_configs()

__all__ = [
    "TEMPORAL_HEADS",
    "DualEncoder",
    "MeanTemporalHead",
    "TemporalHead",
    "TransformerTemporalHead",
    "build_temporal_head",
    "create_model",
    "create_run_model",
    "export_run",
    "file_sha256",
    "load_dual_encoder",
    "load_run",
    "load_temporal_head",
    "load_weights",
    "masked_mean",
    "register_model_configs",
    "register_temporal_head",
    "resolve_architecture",
    "save_run",
]
