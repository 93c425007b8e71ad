"""The scenario matrix: short real training runs covering every pair of factor values.

How the list is made: :data:`FACTORS` names each factor and its values; :func:`pairwise` walks the
full Cartesian product in order and greedily keeps the combination that covers the most value pairs
not yet covered (the first such combination on ties), until every pair of values of every two
factors appears in some scenario. The result is deterministic, and far shorter than the product
(see SCENARIOS; the full product is 10,368 runs here).

The loss family is the ``terms`` factor's other values: after the pairwise rows, :data:`FAMILY_ROWS`
adds one scenario per margin term (``cosface`` ... ``sphereface2``), each with 2 processes and meta
weighting and the other factors rotated, so that every term meets both at once (the pairwise rows
alone only pair each with each). They are deterministic scenarios: 2 processes equal 1 process.

To add a factor: add it to :data:`FACTORS` with its values (first value = the plain default), teach
:func:`train_config` (and, if it affects the equivalence step, ``worker.equivalence_step``) what
each value means, and run ``pytest tests/scenarios``; the list regenerates itself. Every scenario
costs a few seconds of the matrix's budget (under 4 minutes on 2 cores).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

FACTORS: dict[str, tuple] = {
    "processes": (1, 2),
    "data": ("image", "video", "mixed"),
    "meta": ("off", "all", "last_blocks"),
    "meta_gradient": ("jvp", "second_order"),
    "precision": ("no", "bf16"),
    "tower": ("vit", "resnet"),
    "accum_freq": (1, 2),
    "loss_mode": ("global", "local_loss"),
    "terms": ("contrastive", "all", "siglip"),
    "nan_batch": (False, True),
    "trunks": ("trained", "frozen_cached"),  # frozen_cached: model.trainable=heads from a feature cache
    "positives": ("diagonal", "group"),  # group: loss.positives=group, several samples of a batch share a group
}

TOWERS = {"vit": "mmsphere-tiny", "resnet": "mmsphere-tiny-rn"}
TERMS = {"contrastive": {"angular_margin": {"weight": 1.0, "margin": 0.1}},
         "all": {"angular_margin": {"weight": 1.0, "margin": 0.1}, "m2mix": 0.1, "calibrated_uniformity": 0.1, "cma": 0.01},
         "siglip": {"siglip": {"weight": 1.0, "margin": 0.1}, "cma": 0.01}}
# the margin family, each with options off its defaults where they exercise something (SphereFace-R's
# soft normalisation reads the encoder's norms through the gather; Cam-Softmax's c moves every step)
FAMILY = {
    "cosface": {"margin": 0.2, "detach": True},
    "arcface": {"margin": 0.3},
    "sphereface_r": {"margin": 1.3, "version": "v0", "normalization": "soft", "norm_target": 3.0},
    "cam_softmax": {"c_start": 1.5, "c_stop": 1.0, "c_decay": 0.05},
    "sface": {"scale": 12.0, "a": 1.0, "b": 1.5},
    "sphereface2": {"margin": 0.2, "variant": "A"},
}
TERMS.update({name: {name: {"weight": 1.0, **options}, "m2mix": 0.1} for name, options in FAMILY.items()})


def model_config(tower: str, trunks: str = "trained") -> dict:
    """The tiny model of a scenario (SigLIP's learnable logit bias comes from the term's own default)."""
    model = {"name": TOWERS[tower], "temporal_head": "transformer", "max_frames": 4}
    if trunks == "frozen_cached":
        model["trainable"] = "heads"
    return model


MAX_STEPS = 4
GLOBAL_BATCH = 8
FRAMES = 3


@dataclass(frozen=True)
class Scenario:
    """One combination of factor values."""

    processes: int
    data: str
    meta: str
    meta_gradient: str
    precision: str
    tower: str
    accum_freq: int
    loss_mode: str
    terms: str
    nan_batch: bool
    trunks: str
    positives: str

    @property
    def name(self) -> str:
        meta = f"meta-{self.meta}" + ("" if self.meta == "off" else f"-{self.meta_gradient}")
        parts = [f"{self.processes}proc", self.data, meta, self.precision, self.tower,
                 f"accum{self.accum_freq}", self.loss_mode, f"terms-{self.terms}"]
        flags = (["nan"] if self.nan_batch else []) + (["cached"] if self.trunks == "frozen_cached" else [])
        return "_".join(parts + flags + (["group"] if self.positives == "group" else []))

    @property
    def deterministic(self) -> bool:
        """Whether the scenario also checks that 2 processes equal 1 process on the concatenated batch.

        That check (``worker.equivalence_step``) takes the scenario's data, meta weighting, meta
        gradient, accumulation, loss mode and terms, and runs in float64 on the ViT tower whatever
        the scenario's precision and tower: bf16 rounds differently with the reduction order, and
        BatchNorm in train mode normalises each process's rows with their own statistics (as any DDP
        run without SyncBatchNorm does), so neither can equal one process exactly.
        """
        return self.processes == 2


def pairwise(factors: dict[str, tuple] = FACTORS) -> list[dict]:
    """A deterministic greedy covering array of strength 2 over ``factors``."""
    names = list(factors)
    sizes = [len(factors[name]) for name in names]
    # every candidate row as value indices [C, F]; each value pair of two factors gets one integer id
    rows = np.array(list(itertools.product(*(range(size) for size in sizes))), dtype=np.int64)
    columns, offset = [], 0
    for a, b in itertools.combinations(range(len(names)), 2):
        columns.append(offset + rows[:, a] * sizes[b] + rows[:, b])
        offset += sizes[a] * sizes[b]
    pair_ids = np.stack(columns, axis=1)  # [C, pairs of factors]
    uncovered = np.ones(offset, dtype=bool)
    chosen = []
    while uncovered.any():
        best = int(np.argmax(uncovered[pair_ids].sum(axis=1)))  # argmax keeps the first of equal gains
        chosen.append({name: factors[name][index] for name, index in zip(names, rows[best])})
        uncovered[pair_ids[best]] = False
    return chosen


def family_rows() -> list[dict]:
    """One scenario per margin term, with 2 processes and meta weighting, the other factors rotated."""
    rows = []
    for index, name in enumerate(FAMILY):
        rows.append({
            "processes": 2, "data": FACTORS["data"][index % 3], "meta": ("all", "last_blocks")[index % 2],
            "meta_gradient": FACTORS["meta_gradient"][index // 2 % 2], "precision": FACTORS["precision"][index // 3],
            "tower": FACTORS["tower"][(index + 1) % 2], "accum_freq": FACTORS["accum_freq"][index // 2 % 2],
            "loss_mode": FACTORS["loss_mode"][(index + 1) // 2 % 2], "terms": name, "nan_batch": False,
            "trunks": FACTORS["trunks"][int(index == 4)], "positives": FACTORS["positives"][index % 2]})
    return rows


FAMILY_ROWS = family_rows()
SCENARIOS: list[Scenario] = [Scenario(**row) for row in pairwise() + FAMILY_ROWS]


def train_config(scenario: Scenario, shards: dict[str, str], output_dir: str) -> dict:
    """The raw config of a scenario's training run on the matrix's shards."""
    sources = {"image": [{"urls": shards["image"], "modality": "image", "name": "images"}],
               "video": [{"urls": shards["video"], "modality": "video", "name": "clips"}]}
    sources["mixed"] = sources["video"] + sources["image"]
    meta_modality = "image" if scenario.data == "image" else "video"
    return {
        "output_dir": output_dir,
        "seed": 0,
        "model": model_config(scenario.tower, scenario.trunks),
        "data": {"train": sources[scenario.data],
                 "meta": {"urls": shards[f"meta_{meta_modality}"], "modality": meta_modality, "name": "meta"},
                 "frames": FRAMES, "shuffle_buffer": 8, "epoch_samples": 32, "workers": 0,
                 "feature_cache": scenario.trunks == "frozen_cached"},
        "loss": {"terms": TERMS[scenario.terms], "local_loss": scenario.loss_mode == "local_loss",
                 "positives": scenario.positives},
        "meta": {"enabled": scenario.meta != "off", "params": "all" if scenario.meta == "off" else scenario.meta,
                 "gradient": scenario.meta_gradient, "interval": 1, "hidden": 8, "weights_log_every": 1},
        "train": {"max_steps": MAX_STEPS, "batch_size": GLOBAL_BATCH, "lr": 1e-3, "warmup_steps": 1,
                  "accum_freq": scenario.accum_freq, "precision": scenario.precision,
                  "checkpoint_every": MAX_STEPS, "log_every": 1, "cpu": True},
    }
