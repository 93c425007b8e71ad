"""One rank of the multi-process objective test (run by tests/losses/test_distributed.py).

``python distributed_worker.py SPEC OUT_DIR RANK WORLD_SIZE PORT``: joins a gloo group on 127.0.0.1,
takes its slice of the global batch of every case in SPEC, evaluates the objective on LOCAL
features of a tiny shared projection, backpropagates, averages parameter gradients over ranks (what
DDP does) and saves what it saw to OUT_DIR/rank{RANK}.pt for comparison with one process.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as tf

from mmsphere.losses.config import LossConfig
from mmsphere.losses import Objective
from mmsphere.losses.distributed import all_reduce_with_grad, world_info


def features(data: dict, parameters: dict, rows: slice, prefix: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """Unit-norm features of ``rows`` through the shared projections (the 'encoders')."""
    image, text, _ = encoded(data, parameters, rows, prefix)
    return image, text


def encoded(data: dict, parameters: dict, rows: slice, prefix: str = "") -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Unit-norm features of ``rows`` and their norms before normalisation (``image_norms``, ``text_norms``)."""
    image = data[prefix + "raw_image"][rows] @ parameters["projection_image"]
    text = data[prefix + "raw_text"][rows] @ parameters["projection_text"]
    norms = {"image_norms": image.norm(dim=1), "text_norms": text.norm(dim=1)}
    return tf.normalize(image, dim=1), tf.normalize(text, dim=1), norms


def average(tensor: torch.Tensor) -> torch.Tensor:
    """Differentiable mean over ranks (the data-parallel gradient)."""
    return all_reduce_with_grad(tensor) / world_info().world_size


def run_case(case: dict, data: dict, rank: int, sizes: list[int]) -> dict:
    """What rank ``rank`` of ``len(sizes)`` processes sees; ``sizes=[N]`` is the single-process reference."""
    rows = slice(sum(sizes[:rank]), sum(sizes[:rank + 1]))
    parameters = {name: data[name].clone().requires_grad_() for name in ("projection_image", "projection_text",
                                                                          "log_scale", "theta", "logit_bias")}
    objective = Objective(LossConfig(**case["config"]))
    image, text, norms = encoded(data, parameters, rows)
    scale = parameters["log_scale"].exp()
    names = ["projection_image", "projection_text", "log_scale"]
    extras = {"step": case.get("step")}
    if objective.needs_feature_norms:
        extras.update(norms)
    if objective.needs_logit_bias:
        extras["logit_bias"] = parameters["logit_bias"]
        names.append("logit_bias")

    if case["kind"] == "meta":
        # Meta-Weight-Net's virtual step and meta-gradient, with a one-parameter weight net
        def weigh(losses: torch.Tensor) -> torch.Tensor:
            return torch.sigmoid(parameters["theta"] * losses - 1)

        virtual = objective(image, text, scale, sample_weights=weigh, weight_normalize=case["normalize"],
                            seed=case["seed"], **extras)
        gradients = torch.autograd.grad(virtual.loss, [parameters[name] for name in names], create_graph=True)
        stepped = {name: parameters[name] - 0.5 * average(gradient) for name, gradient in zip(names, gradients)}
        meta_image, meta_text = features(data, stepped, rows, prefix="meta_")
        meta = Objective(LossConfig(terms={"clip": 1.0}, local_loss=case["config"].get("local_loss", False)))
        meta_loss = meta(meta_image, meta_text, stepped["log_scale"].exp()).loss
        (theta_gradient,) = torch.autograd.grad(meta_loss, [parameters["theta"]])
        return {"virtual_loss": virtual.loss.detach(), "meta_loss": meta_loss.detach(),
                "theta_gradient": average(theta_gradient.detach())}

    weights = data["weights"][rows] if case["weights"] else None
    if case.get("groups"):
        extras["group_ids"] = data["groups"][rows]
    output = objective(image, text, scale, sample_weights=weights, weight_normalize=case["normalize"],
                       seed=case["seed"], **extras)
    output.loss.backward()
    return {
        "loss": output.loss.detach(),
        "terms": {name: value for name, value in output.terms.items()},
        "per_sample": output.per_sample.detach(),
        "gradients": {name: average(parameters[name].grad) for name in names},
    }


def main(spec_path: str, out_dir: str, rank: int, world_size: int, port: int) -> None:
    torch.set_num_threads(1)
    spec = torch.load(spec_path, weights_only=True)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        results = {case["name"]: run_case(case, spec["data"], rank, case["sizes"]) for case in spec["cases"]}
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
