"""The ablation's variants, read from the term registry: variant names -> config overrides -> run configs."""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Sequence
from typing import Any

import yaml

from mmsphere.config import config_to_dict
from mmsphere.errors import ConfigError
from mmsphere.train.config import Config, config_from_dict
from mmsphere.losses.terms import TERMS

BASELINE_TERM = "angular_margin"  # the contrastive term the techniques are added to (MAMA's)
# older command-line spellings of two variants
ALIASES = {"margin": "angular_margin", "calunif": "calibrated_uniformity"}
ZERO_SHOT = "zero-shot"  # the model before fine-tuning, as each seed initialises it


def known_variants() -> dict[str, dict[str, Any]]:
    """The variants, read from the term registry (data, not code): every registered term and meta weighting.

    A contrastive term alone; any other term at its default weight on top of the baseline's
    angular margin; ``meta``: the baseline with meta weighting; ``all``: every non-contrastive
    term and meta weighting on the baseline. A term that needs the SigLIP bias gets the model's.
    """
    baseline = {BASELINE_TERM: TERMS[BASELINE_TERM].default_weight}
    extras = {name: term.default_weight for name, term in TERMS.items() if not term.contrastive}
    found: dict[str, dict[str, Any]] = {}
    for name, term in TERMS.items():
        terms = {name: term.default_weight} if term.contrastive else {**baseline, name: term.default_weight}
        found[name] = {"loss.terms": terms, "meta.enabled": False}  # a term starts the bias it needs
    found["meta"] = {"loss.terms": dict(baseline), "meta.enabled": True}
    found["all"] = {"loss.terms": {**baseline, **extras}, "meta.enabled": True}
    return found


def checked_variants(names: Sequence[str]) -> list[str]:
    """The variant names in order; unknown, malformed or repeated names are an error."""
    names = [name.strip() for name in names]
    known = known_variants()
    unknown = [name for name in names if _canonical(_base_name(name)) not in known]
    if unknown or not names:
        raise ConfigError(f"unknown variant(s) {unknown or '(none given)'}; known: {', '.join(known)} "
                          f"(a non-contrastive term also as NAME@WEIGHT; a term's options as NAME:FIELD=VALUE)")
    for name in names:
        variant_overrides(name)
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ConfigError(f"variant(s) {repeated} are listed more than once")
    return names


def split_variants(text: str) -> list[str]:
    """``--variants`` text -> variant names: commas separate variants, except inside a variant's options
    (``cam_softmax:c_stop=1.45,c_decay=0.001,clip`` is two variants: a piece with ``=`` and no ``:`` continues the
    options of the variant before it)."""
    names: list[str] = []
    for piece in text.split(","):
        if names and ":" in names[-1] and "=" in piece and ":" not in piece:
            names[-1] += "," + piece
        else:
            names.append(piece)
    return names


def checked_seeds(seeds: Sequence[int]) -> list[int]:
    """Distinct integer seeds, at least one."""
    seeds = list(seeds)
    if not seeds or any(isinstance(seed, bool) or not isinstance(seed, int) for seed in seeds):
        raise ConfigError(f"seeds={seeds} must be one or more integers")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"seeds={seeds} holds repeats")
    return seeds


def variant_overrides(variant: str) -> dict[str, Any]:
    """The config overrides of a variant (see :func:`known_variants`), of ``TERM@WEIGHT`` with that weight, and
    ``...:FIELD=VALUE[,FIELD=VALUE]`` with those options of the variant's own term (``angular_margin:margin=0.2``,
    ``siglip:margin=0.1``, ``cma@0.01:...``); ``NAME+meta`` is that variant with meta weighting on
    (``cosface+meta:margin=0.2``)."""
    variant, colon, options_text = variant.partition(":")
    variant, plus, flag = variant.partition("+")
    if plus and flag != "meta":
        raise ConfigError(f"variant {variant}+{flag}: only '+meta' may follow a variant's name")
    name, at, weight_text = variant.partition("@")
    known = known_variants()
    if _canonical(name) not in known:
        raise ConfigError(f"unknown variant {variant!r}; known: {', '.join(known)}")
    name = _canonical(name)
    overrides = copy.deepcopy(known[name])
    if at:
        if name not in TERMS or TERMS[name].contrastive:
            extras = [term for term, term_class in TERMS.items() if not term_class.contrastive]
            raise ConfigError(f"variant {variant!r}: only the terms added to the baseline ({', '.join(extras)}) "
                              "take @WEIGHT (the weight of the one term they add)")
        try:
            weight = float(weight_text)
        except ValueError:
            raise ConfigError(f"variant {variant!r}: weight {weight_text!r} is not a number") from None
        if not (math.isfinite(weight) and weight > 0):
            raise ConfigError(f"variant {variant!r}: weight {weight_text!r} must be a finite number > 0")
        overrides["loss.terms"][name] = weight
    if colon:
        if name not in TERMS:
            raise ConfigError(f"variant {variant}:{options_text!r}: only a term's variant takes :FIELD=VALUE options")
        options: dict[str, Any] = {"weight": overrides["loss.terms"][name]}
        for item in options_text.split(","):
            field_name, equals, value_text = item.partition("=")
            if not equals or not field_name.strip():
                raise ConfigError(f"variant {variant}:{options_text}: {item!r} is not FIELD=VALUE")
            options[field_name.strip()] = yaml.safe_load(value_text)
        overrides["loss.terms"][name] = options
    if plus:
        overrides["meta.enabled"] = True
    return overrides


def variant_config(base: Config, variant: str, seed: int, output_dir: str | os.PathLike) -> Config:
    """``base`` with the variant's overrides, ``seed`` and ``output_dir``; resumes the run it finds there."""
    raw = config_to_dict(base)
    for key, value in variant_overrides(variant).items():
        section, _, name = key.partition(".")
        raw[section][name] = _with_base_fields(value, raw["loss"]["terms"]) if key == "loss.terms" else value
    raw.update(output_dir=str(output_dir), seed=seed)
    raw["train"]["resume"] = "latest"  # an interrupted study continues from the last checkpoint
    try:
        return config_from_dict(raw)
    except ConfigError as error:
        raise ConfigError(f"variant {variant!r}: {error}") from None


def _with_base_fields(terms: dict[str, Any], base_terms: dict[str, Any]) -> dict[str, Any]:
    """A variant's ``loss.terms`` with the fields the base config sets for the same terms (the variant's own win).

    The base config's other settings are kept: ``angular_margin: {weight: 1.0, margin: 0.2}`` in the base
    keeps margin 0.2 in every variant that uses ``angular_margin``.
    """
    merged = {}
    for name, entry in terms.items():
        base_entry = base_terms.get(name)
        fields = {key: value for key, value in base_entry.items() if key != "weight"} if isinstance(base_entry, dict) else {}
        if not fields:
            merged[name] = entry
        else:
            merged[name] = {**fields, **entry} if isinstance(entry, dict) else {"weight": entry, **fields}
    return merged


def seeded_config(base: Config, seed: int, output_dir: str | os.PathLike) -> Config:
    """``base`` unchanged but for ``seed`` and ``output_dir``: the ``zero-shot`` row's config."""
    raw = config_to_dict(base)
    raw.update(output_dir=str(output_dir), seed=seed)
    return config_from_dict(raw)


def _base_name(variant: str) -> str:
    """The registry name a variant string starts with: ``cosface+meta:margin=0.2`` -> ``cosface``."""
    return variant.partition(":")[0].partition("+")[0].partition("@")[0]


def _canonical(name: str) -> str:
    return ALIASES.get(name, name)
