"""One optimisation step of the real training-loop functions, run under torchrun by the tests.

``python -m torch.distributed.run --nproc_per_node N distributed_step.py OUT_DIR``: for meta weighting
off/on and global/local loss, every rank takes its slice of one fixed global batch, runs (optionally)
the meta step and one real step, and rank 0 saves the loss and the updated parameters for comparison
across world sizes (one launch for all four set-ups: process start-up dominates the cost).
"""

from __future__ import annotations

import sys

import torch
from accelerate.utils import set_seed

from mmsphere.train.config import config_from_dict
from mmsphere.data import Batch
from mmsphere.losses import Objective
from mmsphere.models import create_model
from mmsphere.weighting import MetaWeighting
from mmsphere.train.loop import build_accelerator, local_batch_size
from mmsphere.train.step import optimization_step
from mmsphere.train.task import Task
from mmsphere.train.optim import build_optimizer, cosine_schedule

GLOBAL_BATCH = 8


def one_step(accelerator, out: str, meta: bool, local_loss: bool) -> None:
    config = config_from_dict({
        "model": {"name": "mmsphere-tiny"},
        "data": {"train": [{"urls": "unused.tar", "modality": "image"}], "meta": {"urls": "unused.tar", "modality": "image"}},
        "loss": {"terms": {"angular_margin": 1.0, "m2mix": 0.5, "calibrated_uniformity": 0.5, "cma": 0.1},
                 "local_loss": local_loss},
        "meta": {"enabled": meta, "params": "heads", "hidden": 8, "lr": 0.05, "virtual_lr": 0.5},
        "train": {"batch_size": GLOBAL_BATCH, "lr": 1e-2, "warmup_steps": 0, "max_steps": 10, "cpu": True},
    })
    rank, world_size = accelerator.process_index, accelerator.num_processes
    local = local_batch_size(GLOBAL_BATCH, world_size)
    set_seed(0)
    network = create_model(config.model).double()
    objective = Objective(config.loss)
    optimizer = build_optimizer(network, config)
    scheduler = cosine_schedule(optimizer, 0, 10)
    model, optimizer = accelerator.prepare(network, optimizer)
    weighting = MetaWeighting(config, network, objective) if meta else None
    if weighting is not None:
        weighting.weight_net.double()
        weighting.optimizer = torch.optim.Adam(weighting.weight_net.parameters(), lr=config.meta.lr)

    generator = torch.Generator().manual_seed(1)
    batch = {"text": torch.randint(1, 400, (GLOBAL_BATCH, 16), generator=generator),
             "images": torch.randn(GLOBAL_BATCH, 3, 32, 32, generator=generator, dtype=torch.float64)}
    meta_batch = {"text": torch.randint(1, 400, (GLOBAL_BATCH, 16), generator=generator),
                  "images": torch.randn(GLOBAL_BATCH, 3, 32, 32, generator=generator, dtype=torch.float64)}
    rows = slice(rank * local, (rank + 1) * local)
    inputs = Batch("image", batch["images"][rows], text=batch["text"][rows])
    meta_inputs = Batch("image", meta_batch["images"][rows], text=meta_batch["text"][rows])

    task = Task.from_config(config, network, accelerator, model=model, objective=objective, weighting=weighting,
                            scheduler=scheduler)
    outcome = optimization_step(task, inputs, optimizer, meta_batch=meta_inputs if meta else None, step=7)
    assert not outcome.skipped
    if rank == 0:
        torch.save({"loss": outcome.output.terms["total"].item(),
                    "parameters": {name: p.detach().clone() for name, p in network.named_parameters()},
                    "weight_net": None if weighting is None else weighting.weight_net.state_dict()}, out)
    accelerator.wait_for_everyone()


def main(out_dir: str) -> None:
    accelerator = None
    for meta in (False, True):
        for local_loss in (False, True):
            if accelerator is None:
                accelerator = build_accelerator(config_from_dict({
                    "data": {"train": [{"urls": "unused.tar"}]}, "train": {"cpu": True}}))
            one_step(accelerator, f"{out_dir}/meta{int(meta)}_local{int(local_loss)}.pt", meta, local_loss)


if __name__ == "__main__":
    main(sys.argv[1])
