"""The ``loss`` section of a run's configuration: which objective terms, their weights and fields.

Each term declares its own fields (its ``Options``, see :mod:`mmsphere.losses.terms`); this section
holds the mapping ``terms`` plus the settings of the objective as a whole. Configs written before
per-term fields set eight flat keys (``loss.margin``, ``loss.tau_mix``, ...); :func:`migrate_legacy_keys`
rewrites them into the fields of the terms that read them when the config is loaded.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from mmsphere.config import require
from mmsphere.errors import ConfigError
from mmsphere.losses.terms import resolve_terms
from mmsphere.user_modules import import_user_module

__all__ = ["LossConfig", "LEGACY_KEYS", "migrate_legacy_keys"]

logger = logging.getLogger(__name__)

DEFAULT_TERMS = {"angular_margin": 1.0}

# the flat loss keys of configs written before per-term fields -> (the term that read it, its field)
LEGACY_KEYS: dict[str, tuple[str, str]] = {
    "margin": ("angular_margin", "margin"),
    "m2mix_alpha": ("m2mix", "alpha"),
    "tau_mix": ("m2mix", "tau"),
    "uniformity_t": ("calibrated_uniformity", "t"),
    "calibration_alpha": ("calibrated_uniformity", "alpha"),
    "min_sim": ("calibrated_uniformity", "min_sim"),
    "max_sim": ("calibrated_uniformity", "max_sim"),
    "detach_calibration": ("calibrated_uniformity", "detach_calibration"),
}


@dataclass
class LossConfig:
    """The composed objective: which terms, their weights and their fields."""

    # term name -> weight, or -> {weight: ..., <the term's fields>}; the names are those of the term
    # registry (mmsphere.losses.terms), including a user's own terms from the modules in `imports`
    terms: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_TERMS))
    positives: str = "diagonal"  # diagonal | group: samples sharing a group id are positives of each other
    imports: list[str] = field(default_factory=list)  # modules that register terms (loss.imports: [my_terms])
    local_loss: bool = False
    gather_with_grad: bool = True

    @classmethod
    def migrate(cls, raw: dict[str, Any]) -> dict[str, Any]:
        """The raw section with older configs' flat keys rewritten (see :func:`migrate_legacy_keys`)."""
        return migrate_legacy_keys(raw)

    def validate(self) -> None:
        """Raise :class:`~mmsphere.errors.ConfigError` for values that are well-typed but impossible."""
        require(self.positives in ("diagonal", "group"),
                f"loss.positives={self.positives!r} must be 'diagonal' or 'group'")
        for module in self.imports:
            try:
                import_user_module(module)  # registers the user's own terms (found in the working directory too)
            except ImportError as error:
                raise ConfigError(f"loss.imports: cannot import {module!r} ({error})") from None
        resolve_terms(self.terms)
        require(self.gather_with_grad or not self.local_loss,
                "loss.local_loss=true needs loss.gather_with_grad=true: each rank's rows must send gradients "
                "to the other ranks' features")


def migrate_legacy_keys(raw: dict[str, Any]) -> dict[str, Any]:
    """The raw ``loss`` mapping with its flat legacy keys moved into ``terms``; one log line per key.

    A flat key used to be the default of one term's field (``margin`` of ``angular_margin``, ``tau_mix``
    of ``m2mix``'s ``tau``, ...). When that term is in ``terms`` (``terms`` absent: the default terms),
    the value becomes its field: ``{angular_margin: 1.0}`` with ``margin: 0.2`` is
    ``{angular_margin: {weight: 1.0, margin: 0.2}}``. Otherwise the key never had an effect and is
    dropped. A field set both ways is an error naming both keys. ``raw`` itself is not changed.
    """
    legacy = [key for key in raw if key in LEGACY_KEYS]
    if not legacy:
        return raw
    raw = dict(raw)
    terms = raw.get("terms", dict(DEFAULT_TERMS))
    if not isinstance(terms, dict):
        raise ConfigError(f"loss.terms must be a mapping of term names, got {terms!r} (with the older flat key "
                          f"loss.{legacy[0]} it cannot be migrated)")
    terms = dict(terms)
    for key in legacy:
        value = raw.pop(key)
        name, field_name = LEGACY_KEYS[key]
        new_key = f"loss.terms.{name}.{field_name}"
        if name not in terms:
            logger.warning("loss.%s=%r dropped: it sets %s, and loss.terms has no %s term, so it had no effect",
                           key, value, new_key, name)
            continue
        entry = terms[name]
        entry = dict(entry) if isinstance(entry, dict) else {"weight": entry}
        if field_name in entry:
            raise ConfigError(f"loss.{key}={value!r} and {new_key}={entry[field_name]!r} are both set: they are the "
                              f"same field (loss.{key} is its older flat form); set only {new_key}")
        entry[field_name] = value
        terms[name] = entry
        logger.warning("loss.%s=%r -> %s=%r (older flat key rewritten; write the new form)",
                       key, value, new_key, value)
    raw["terms"] = terms
    return raw
