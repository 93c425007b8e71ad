"""``mmsphere sface-ab``: SFace's ``a`` and ``b`` measured on the first training batches of a config.

SFace's sigmoids stop pulling a positive nearer than ``a`` and stop pushing a negative farther than
``b`` (radians). The face defaults (0.8, 1.23) were set for class proxies; a CLIP-like start puts its
negatives near 1.47 rad, where b = 1.23 gives them no push at all. This command encodes the first
``--batches`` training batches with the model a run of the config starts from (same seed, same
stream, feature cache if the config has one), and prints ``a`` = the ``--positive-quantile`` of the
positive pairs' angles and ``b`` = the ``--negative-quantile`` of the negatives'
(:func:`mmsphere.losses.margins.sface_ab_from_features`), as overrides to paste into a run.
"""

from __future__ import annotations

import argparse
import json
import logging

import torch

from mmsphere.cli_errors import ArgumentParser, run_cli
from mmsphere.errors import ConfigError
from mmsphere.train.config import Config, load_config


def main(argv: list[str] | None) -> int:
    """Measure SFace's a, b on a config's first training batches and print them."""
    parser = ArgumentParser(prog="mmsphere sface-ab", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="training config (YAML)")
    parser.add_argument("--batches", type=int, default=4, help="training batches to measure on (default 4)")
    parser.add_argument("--positive-quantile", type=float, default=0.1, help="a: this quantile of positive angles")
    parser.add_argument("--negative-quantile", type=float, default=0.9, help="b: this quantile of negative angles")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides of the config")
    return run_cli(parser, argv, _measure)


def measured_sface_ab(config: Config, *, batches: int = 4, positive_quantile: float = 0.1,
                      negative_quantile: float = 0.9) -> tuple[float, float]:
    """``(a, b)`` from the angles of the first ``batches`` training batches under the run's starting model (one process)."""
    # lazy: open_clip and the data stack take seconds to import; `mmsphere sface-ab --help` should not
    from mmsphere.cache.build import build_config_caches
    from mmsphere.data.mixing import build_train_stream
    from mmsphere.losses.margins import sface_ab_from_features
    from mmsphere.models import create_run_model

    if batches < 1:
        raise ConfigError(f"--batches={batches} must be >= 1")
    model = create_run_model(config)
    model.eval()
    caches = build_config_caches(model, config, progress=False)[0] if config.data.feature_cache else None
    stream = build_train_stream(config.data.train, config.data, batch_size=config.train.batch_size, split="train",
                                image_size=model.image_size, image_mean=model.image_mean, image_std=model.image_std,
                                tokenizer=model.tokenizer, seed=config.seed, feature_caches=caches,
                                positives=config.loss.positives)
    a_values, b_values = [], []
    with torch.no_grad():
        for index, batch in enumerate(stream):
            if index == batches:
                break
            features = model(**batch.encoder_inputs())
            # per batch: positives are only defined within a batch (its group ids), as the loss sees them
            a, b = sface_ab_from_features(features["image_features"], features["text_features"], batch.group_ids,
                                          positive_quantile, negative_quantile)
            a_values.append(a)
            b_values.append(b)
    if len(a_values) < batches:
        raise ConfigError(f"--batches={batches}: the training stream holds only {len(a_values)} batches")
    # the mean of the per-batch quantiles: each batch is one draw of the angles the loss will see
    return sum(a_values) / len(a_values), sum(b_values) / len(b_values)


def _measure(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    config = load_config(args.config, args.overrides)
    a, b = measured_sface_ab(config, batches=args.batches, positive_quantile=args.positive_quantile,
                             negative_quantile=args.negative_quantile)
    print(json.dumps({"a": round(a, 4), "b": round(b, 4), "batches": args.batches,
                      "override": f"loss.terms.sface.a={a:.4f} loss.terms.sface.b={b:.4f}"}))
    return 0
