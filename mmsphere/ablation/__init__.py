"""Ablations: variants of one base config trained on the same model, data, steps and seeds, then compared.

A variant is a few overrides of the base config (:func:`known_variants`, read from the term registry); a
technique that adds one term also takes another weight as ``TECHNIQUE@WEIGHT`` (``cma@0.1``). For every
variant and seed, :func:`run_ablation` fine-tunes into ``OUT/VARIANT/seed_S``, evaluates the saved
run on ``data.val`` (retrieval in both directions and the embedding geometry), OoD detection when
:class:`OodSets` are given, and how well the learned sample weights single out mismatched pairs
when their keys are known. ``OUT/ablation.json`` holds every run's numbers, ``OUT/ablation.md`` the
mean ± sample standard deviation over seeds per variant with the training time, ``OUT/ablation.png``
every seed's R@1. A study that was interrupted continues where it stopped: a run with results is
reused, a run with checkpoints resumes, and a run directory trained from another config is an error.

The package, top to bottom: :mod:`.variants` (variant names -> config overrides -> run configs),
:mod:`.runs` (the study: train or resume or reuse, evaluate, record), :mod:`.evaluation` (retrieval,
OoD and learned-weight metrics of one run), :mod:`.summary` (statistics over seeds, markdown, plot)
and :mod:`.cli` (``mmsphere ablate``; the library never imports it).

    python scripts/ablate.py --config configs/demo.yaml --variants clip,margin,meta --seeds 3 --out runs/ablation
"""

from mmsphere.ablation.evaluation import (
    OOD_SCORES,
    OodSets,
    evaluate_model,
    evaluate_ood,
    evaluate_weights,
    read_mismatched_keys,
)
from mmsphere.ablation.runs import RUN_RESULT, check_same_config, run_ablation, run_variant
from mmsphere.ablation.summary import ablation_markdown, aggregate, format_mean_std, mean_and_std, plot_ablation
from mmsphere.ablation.variants import (
    ZERO_SHOT,
    checked_seeds,
    checked_variants,
    known_variants,
    variant_config,
    variant_overrides,
)

__all__ = [
    "OOD_SCORES",
    "RUN_RESULT",
    "ZERO_SHOT",
    "OodSets",
    "ablation_markdown",
    "aggregate",
    "check_same_config",
    "checked_seeds",
    "checked_variants",
    "evaluate_model",
    "evaluate_ood",
    "evaluate_weights",
    "format_mean_std",
    "known_variants",
    "mean_and_std",
    "plot_ablation",
    "read_mismatched_keys",
    "run_ablation",
    "run_variant",
    "variant_config",
    "variant_overrides",
]
