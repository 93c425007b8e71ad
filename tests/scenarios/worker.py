"""Runs the scenario matrix's training runs of one world size, under torchrun (one launch per world size).

``python -m torch.distributed.run --nproc_per_node N worker.py SHARDS_JSON OUT_DIR``: for every scenario
with N processes, a real :func:`mmsphere.train.train` run on the generated shards; and for every
deterministic scenario (whatever its process count), one float64 optimisation step of the real
step functions on a fixed global batch, saved for the 1-vs-2-process comparison. Before each
scenario rank 0 writes ``OUT_DIR/started`` with its name, and a watchdog ends the process with a
stack dump of every thread if a scenario outlives its timeout, so a hang fails with the
scenario's name instead of blocking CI. Process start-up dominates the cost of such short runs,
hence one launch for all scenarios of a world size.
"""

from __future__ import annotations

import faulthandler
import json
import math
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import set_seed

from mmsphere.config import config_from_dict
from mmsphere.losses import Objective
from mmsphere.models import create_model, load_run
from mmsphere.train import loop
from mmsphere.train.optim import build_optimizer, cosine_schedule
from mmsphere.train.step import optimization_step
from mmsphere.weighting import MetaWeighting

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.scenarios.matrix import (  # noqa: E402
    FRAMES, GLOBAL_BATCH, SCENARIOS, TERMS, Scenario, model_config, train_config)

SCENARIO_TIMEOUT_S = 120
NAN_AT_TRAIN_BATCH = 1  # the second training batch, on rank 0 only


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


def train_run(scenario: Scenario, shards: dict[str, str], output_dir: Path, rank: int) -> dict:
    """A real training run; the batches it saw and the finiteness of what it left behind."""
    _fresh_accelerate_state()
    modalities: list[str] = []
    original = loop.model_inputs
    train_batches = 0

    def observed_inputs(batch, device):
        nonlocal train_batches
        inputs = original(batch, device)
        if batch["source"] != "meta":
            modalities.append(batch["modality"])
            if scenario.nan_batch and train_batches == NAN_AT_TRAIN_BATCH and rank == 0:
                # rank-local bad data: every collective must still be called by every rank
                # pixels, or the trunk features a cached scenario's batches hold instead
                visual = next(name for name in ("images", "frames", "image_trunk", "frame_trunk") if name in inputs)
                inputs[visual][0] = float("nan")
            train_batches += 1
        return inputs

    loop.model_inputs = observed_inputs
    try:
        summary = loop.train(config_from_dict(train_config(scenario, shards, str(output_dir))))
    finally:
        loop.model_inputs = original
    result = {"summary": summary, "modalities": modalities}
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


def equivalence_step(scenario: Scenario, out: Path, rank: int, world_size: int, gradient: str) -> None:
    """One float64 step per modality of the scenario on a fixed global batch; rank 0 saves what it changed.

    On the ViT tower in float64 whatever the scenario's (see ``Scenario.deterministic``).
    """
    _fresh_accelerate_state()
    terms = TERMS[scenario.terms]
    config = config_from_dict({
        "model": model_config("vit", scenario.terms),
        "data": {"train": [{"urls": "unused.tar"}], "meta": {"urls": "unused.tar"}, "frames": FRAMES},
        "loss": {"terms": terms, "local_loss": scenario.loss_mode == "local_loss"},
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
    losses = []
    for modality in (("image", "video") if scenario.data == "mixed" else (scenario.data,)):
        batch, meta_batch = (_global_batch(modality, generator) for _ in range(2))
        rows = slice(rank * local, (rank + 1) * local)
        inputs = {name: tensor[rows] for name, tensor in batch.items()}
        meta_inputs = {name: tensor[rows] for name, tensor in meta_batch.items()} if weighting else None
        outcome = optimization_step(model, network, objective, optimizer, scheduler, accelerator, config, inputs,
                                    seed=7, weighting=weighting, meta_inputs=meta_inputs)
        assert not outcome.skipped
        losses.append(outcome.output.terms["total"].item())
    if rank == 0:
        torch.save({"losses": losses,
                    "parameters": {name: p.detach().clone() for name, p in network.named_parameters()},
                    "weight_net": None if weighting is None else weighting.weight_net.state_dict()}, out)
    accelerator.wait_for_everyone()


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
