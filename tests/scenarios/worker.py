"""Runs the scenario matrix's training runs of one world size, under torchrun (one launch per world size).

``python -m torch.distributed.run --nproc_per_node N worker.py SHARDS_JSON OUT_DIR``: for every scenario
with N processes, a real :func:`mmsphere.train.train` run on the generated shards (a scenario on a
feature cache also runs again in float32 with and without the cache, to compare); and for every
deterministic scenario (whatever its process count), one float64 optimisation step of the real
step functions on a fixed global batch, saved for the 1-vs-2-process comparison. Before each
scenario rank 0 writes ``OUT_DIR/started`` with its name, and a watchdog ends the process with a
stack dump of every thread if a scenario outlives its timeout, so a hang fails with the
scenario's name instead of blocking CI. Process start-up dominates the cost of such short runs,
hence one launch for all scenarios of a world size.
"""

from __future__ import annotations

import dataclasses
import faulthandler
import json
import math
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import set_seed

from mmsphere.train.config import config_from_dict
from mmsphere.data import Batch
from mmsphere.losses import Objective
from mmsphere.models import create_model, load_run
from mmsphere.models.dual_encoder import DualEncoder
from mmsphere.train import loop
from mmsphere.train.optim import build_optimizer, cosine_schedule
from mmsphere.train.step import optimization_step
from mmsphere.train.task import Task
from mmsphere.weighting import MetaWeighting

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.scenarios.matrix import (  # noqa: E402
    FRAMES, GLOBAL_BATCH, SCENARIOS, TERMS, Scenario, model_config, train_config)

SCENARIO_TIMEOUT_S = 120
NAN_AT_TRAIN_BATCH = 1  # the second training batch, on rank 0 only
# the equivalence step's group ids (loss.positives=group): groups 0 and 1 span both processes' halves
TRAIN_GROUPS = torch.tensor([0, 1, 0, 2, 1, 0, 3, 3])
META_GROUPS = torch.tensor([5, 5, 6, 7, 6, 5, 7, 8])
# every way the dual encoder runs its trunks: the uncached forward paths and the cache build
# where the trunks run: every encode path (public encode_* and forward) goes through these
TRUNK_METHODS = ("_image_unnormalized", "_video_unnormalized", "_text_unnormalized", "image_trunk_features",
                 "text_trunk_features")


def main(shards_path: str, out_dir: str) -> None:
    shards = json.loads(Path(shards_path).read_text())
    out = Path(out_dir)
    # one process group for every scenario: train() leaves a group it did not create alone
    dist.init_process_group("gloo")
    world_size, rank = dist.get_world_size(), dist.get_rank()
    for scenario in SCENARIOS:
        runs_here = scenario.processes == world_size
        if not runs_here and not scenario.deterministic:
            continue
        if rank == 0:
            (out / "started").write_text(scenario.name)
        faulthandler.dump_traceback_later(SCENARIO_TIMEOUT_S, exit=True)
        if runs_here:
            result = train_run(scenario, shards, out / scenario.name, rank)
            if scenario.trunks == "frozen_cached":
                result["cache_twin"] = cache_twin(scenario, shards, out, rank, result)
            if rank == 0:
                (out / f"{scenario.name}.json").write_text(json.dumps(result))
        if scenario.deterministic:
            # with meta weighting, both ways of computing the meta-gradient, to compare them too
            for gradient in ("jvp", "second_order") if scenario.meta != "off" else ("jvp",):
                equivalence_step(scenario, out / f"{scenario.name}.world{world_size}.{gradient}.pt", rank, world_size,
                                 gradient)
        faulthandler.cancel_dump_traceback_later()
    if rank == 0:
        (out / "started").write_text("")
    dist.destroy_process_group()


def _fresh_accelerate_state() -> None:
    """Each scenario builds its own Accelerator (precisions differ): start accelerate afresh, on the same group."""
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def train_run(scenario: Scenario, shards: dict[str, str], output_dir: Path, rank: int, **changes) -> dict:
    """A real training run; the batches it saw, how often the trunks ran, and the finiteness of what it left behind.

    ``changes``: ``precision`` or ``feature_cache`` other than the scenario's (the cache twin's runs).
    """
    _fresh_accelerate_state()
    modalities: list[str] = []
    batch_keys: list[list[str]] = []
    visual_inputs: set[str] = set()
    shared_group_batches = 0
    original = loop.optimization_step
    train_batches = 0

    def observe(batch):
        nonlocal train_batches, shared_group_batches
        visual = next(iter(batch.media_inputs()))  # images, frames, image_trunk or frame_trunk
        visual_inputs.add(visual)
        batch_keys.append([batch.source, *batch.keys])
        if batch.source != "meta":
            modalities.append(batch.modality)
            shared_group_batches += len(set(batch.groups)) < len(batch.groups)
            if scenario.nan_batch and train_batches == NAN_AT_TRAIN_BATCH and rank == 0:
                # rank-local bad data: every collective must still be called by every rank
                # pixels, or the trunk features a cached scenario's batches hold instead
                batch.media[0] = float("nan")
            train_batches += 1

    def observed_step(task, batch, optimizer, meta_batch=None, **keywords):
        observe(batch)
        if meta_batch is not None:
            observe(meta_batch)
        return original(task, batch, optimizer, meta_batch=meta_batch, **keywords)

    trunk_runs = {"before": 0, "after": 0}  # before and after the feature cache was built (if it is)
    phase = ["before"]
    original_methods = {name: getattr(DualEncoder, name) for name in TRUNK_METHODS}

    def counted(method):
        """``method``, counting its calls in the current phase."""

        def run(*args, **kwargs):
            trunk_runs[phase[0]] += 1
            return method(*args, **kwargs)
        return run

    original_build = loop.build_config_caches

    def build_then_count(*args, **kwargs):
        caches = original_build(*args, **kwargs)
        phase[0] = "after"
        return caches

    raw = train_config(scenario, shards, str(output_dir))
    if "precision" in changes:
        raw["train"]["precision"] = changes["precision"]
    if "feature_cache" in changes:
        raw["data"]["feature_cache"] = changes["feature_cache"]
    loop.optimization_step, loop.build_config_caches = observed_step, build_then_count
    for name in TRUNK_METHODS:
        setattr(DualEncoder, name, counted(original_methods[name]))
    try:
        summary = loop.train(config_from_dict(raw))
    finally:
        loop.optimization_step, loop.build_config_caches = original, original_build
        for name, method in original_methods.items():
            setattr(DualEncoder, name, method)
    cache_read = raw["data"]["feature_cache"]
    # every rank's trunk runs: a rank that fell back to decoding would show here
    counts = torch.tensor([trunk_runs["before"], trunk_runs["after"]])
    dist.all_reduce(counts)
    result = {"summary": summary, "modalities": modalities, "batch_keys": batch_keys,
              "visual_inputs": sorted(visual_inputs), "shared_group_batches": shared_group_batches,
              "cache_built": phase[0] == "after" if cache_read else None,
              "trunk_runs_in_training": int(counts[1]) if cache_read else int(counts.sum())}
    if rank == 0:
        metrics = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
        values = [value for record in metrics for name, value in record.items() if name.startswith(("loss/", "meta/"))]
        result["metrics_finite"] = bool(values) and all(math.isfinite(value) for value in values)
        model = load_run(output_dir)
        result["model_finite"] = all(bool(torch.isfinite(tensor).all()) for tensor in model.state_dict().values()
                                     if tensor.is_floating_point())
        weights_file = output_dir / "sample_weights.jsonl"
        if weights_file.is_file():
            rows = [json.loads(line) for line in weights_file.read_text().splitlines()]
            result["sample_weights"] = len(rows)
            result["sample_weights_finite"] = all(math.isfinite(row["weight"]) for row in rows)
    return result


def cache_twin(scenario: Scenario, shards: dict[str, str], out: Path, rank: int, result: dict) -> dict:
    """The cached scenario in float32 with and without its feature cache: the two runs the test compares.

    In float32 whatever the scenario's precision: under bf16 autocast the uncached trunks run in bf16,
    while the cache holds the float32 trunk features (built outside autocast), so only float32 runs
    can agree to rounding. The scenario's own run is the cached one when it already is float32.
    """
    runs = {}
    if scenario.precision == "no":
        runs["cached"] = (scenario.name, result)
    else:
        name = f"{scenario.name}.cached_float32"
        runs["cached"] = (name, train_run(scenario, shards, out / name, rank, precision="no"))
    name = f"{scenario.name}.uncached_float32"
    runs["uncached"] = (name, train_run(scenario, shards, out / name, rank, precision="no", feature_cache=False))
    keep = ("summary", "batch_keys", "visual_inputs", "trunk_runs_in_training")
    return {kind: {"run": name, **{key: run[key] for key in keep}} for kind, (name, run) in runs.items()}


def equivalence_step(scenario: Scenario, out: Path, rank: int, world_size: int, gradient: str) -> None:
    """One float64 step per modality of the scenario on a fixed global batch; rank 0 saves what it changed.

    On the ViT tower in float64 whatever the scenario's (see ``Scenario.deterministic``). With
    ``loss.positives=group`` the batches carry :data:`TRAIN_GROUPS` and :data:`META_GROUPS`, and the
    single process also saves the features of its first batch with the contrastive term's per-sample
    values, which the test checks against a loop transcription of the grouped loss.
    """
    _fresh_accelerate_state()
    terms = TERMS[scenario.terms]
    config = config_from_dict({
        "model": model_config("vit"),
        "data": {"train": [{"urls": "unused.tar"}], "meta": {"urls": "unused.tar"}, "frames": FRAMES},
        "loss": {"terms": terms, "local_loss": scenario.loss_mode == "local_loss", "positives": scenario.positives},
        "meta": {"enabled": scenario.meta != "off", "params": "all" if scenario.meta == "off" else scenario.meta,
                 "gradient": gradient, "hidden": 8, "lr": 0.05, "normalize": "sum"},
        "train": {"batch_size": GLOBAL_BATCH, "lr": 1e-2, "warmup_steps": 0, "max_steps": 10,
                  "accum_freq": scenario.accum_freq, "cpu": True},
    })
    accelerator = loop.build_accelerator(config)
    local = loop.local_batch_size(GLOBAL_BATCH, world_size, scenario.accum_freq)
    set_seed(0)
    network = create_model(config.model).double()
    objective = Objective(config.loss)
    optimizer = build_optimizer(network, config)
    scheduler = cosine_schedule(optimizer, 0, 10)
    model, optimizer = accelerator.prepare(network, optimizer)
    weighting = None
    if config.meta.enabled:
        weighting = MetaWeighting(config, network, objective)
        weighting.weight_net.double()
        # plain SGD: the update is the meta-gradient itself, so the two gradient modes compare tightly
        weighting.optimizer = torch.optim.SGD(weighting.weight_net.parameters(), lr=config.meta.lr)
    generator = torch.Generator().manual_seed(1)
    rows = slice(rank * local, (rank + 1) * local)
    grouped = scenario.positives == "group"
    group_ids = TRAIN_GROUPS[rows] if grouped else None
    meta_group_ids = META_GROUPS[rows] if grouped and weighting else None
    losses, group_reference = [], None
    task = Task.from_config(config, network, accelerator, model=model, objective=objective, weighting=weighting,
                            scheduler=scheduler)
    for modality in (("image", "video") if scenario.data == "mixed" else (scenario.data,)):
        batch, meta_batch = (_global_batch(modality, generator) for _ in range(2))
        inputs = {name: tensor[rows] for name, tensor in batch.items()}
        meta_inputs = {name: tensor[rows] for name, tensor in meta_batch.items()} if weighting else None
        if grouped and world_size == 1 and group_reference is None:
            with torch.no_grad():
                features = network(**inputs)
                evaluated = objective.evaluate(**features, group_ids=group_ids, seed=7, step=7)
            options = dataclasses.asdict(objective.terms[objective.contrastive].options)
            group_reference = {**features, "group_ids": group_ids, "per_sample": evaluated.per_sample,
                               "term": objective.contrastive, "options": options, "step": 7}
        outcome = optimization_step(task, _as_batch(modality, inputs, group_ids), optimizer,
                                    meta_batch=_as_batch(modality, meta_inputs, meta_group_ids) if meta_inputs else None,
                                    step=7)
        assert not outcome.skipped
        losses.append(outcome.output.terms["total"].item())
    if rank == 0:
        torch.save({"losses": losses,
                    "parameters": {name: p.detach().clone() for name, p in network.named_parameters()},
                    "weight_net": None if weighting is None else weighting.weight_net.state_dict(),
                    "group_reference": group_reference}, out)
    accelerator.wait_for_everyone()


def _as_batch(modality: str, inputs: dict[str, torch.Tensor], group_ids: torch.Tensor | None) -> Batch:
    """The step's typed batch of this process's rows (``images`` or ``frames`` + ``frame_mask``, tokens, group ids)."""
    media = inputs["images"] if modality == "image" else inputs["frames"]
    return Batch(modality, media, inputs.get("frame_mask"), text=inputs["text"], group_ids=group_ids)


def _global_batch(modality: str, generator: torch.Generator) -> dict[str, torch.Tensor]:
    text = torch.randint(1, 400, (GLOBAL_BATCH, 16), generator=generator)
    if modality == "image":
        return {"text": text, "images": torch.randn(GLOBAL_BATCH, 3, 32, 32, generator=generator, dtype=torch.float64)}
    frame_mask = torch.ones(GLOBAL_BATCH, FRAMES, dtype=torch.bool)
    frame_mask[::3, -1] = False  # some clips shorter than FRAMES
    return {"text": text, "frames": torch.randn(GLOBAL_BATCH, FRAMES, 3, 32, 32, generator=generator,
                                                dtype=torch.float64), "frame_mask": frame_mask}


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
