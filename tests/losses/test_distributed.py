"""Two real processes over gloo against one process on the concatenated batch.

Every rank gets LOCAL features; after backward and the averaging of parameter gradients over ranks
(what DDP does), loss, logged terms, per-sample losses and gradients must equal the single-process
values, for global and local loss, with and without sample weights, uneven batches included. The
meta-weighting case checks second-order gradients through the gathers.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.losses.distributed_worker import run_case

pytestmark = pytest.mark.slow

WORKER = Path(__file__).with_name("distributed_worker.py")
REPO = Path(__file__).resolve().parents[2]
ALL_TERMS = {"angular_margin": 1.0, "m2mix": 0.5, "calibrated_uniformity": 0.3, "cma": 0.2}


def case(name: str, *, kind: str = "step", sizes=(4, 4), weights: bool = False, normalize: str = "mean",
         seed: int | None = 11, groups: bool = False, step: int | None = None, **config) -> dict:
    return {"name": name, "kind": kind, "sizes": list(sizes), "weights": weights, "normalize": normalize,
            "seed": seed, "groups": groups, "step": step, "config": {"terms": dict(ALL_TERMS), **config}}


CASES = [
    case("global"),
    case("global_weights_mean", weights=True),
    case("global_weights_sum", weights=True, normalize="sum"),
    case("global_uneven_weights_sum", sizes=(3, 5), weights=True, normalize="sum"),
    case("global_gather_without_grad", weights=True, gather_with_grad=False),
    case("local", local_loss=True),
    case("local_weights_mean", weights=True, local_loss=True),
    case("local_weights_sum", weights=True, normalize="sum", local_loss=True),
    case("local_uneven_weights_sum", sizes=(5, 3), weights=True, normalize="sum", local_loss=True),
    case("local_clip_calibration_with_grad", local_loss=True,
         terms={"clip": 1.0, "calibrated_uniformity": {"weight": 0.5, "detach_calibration": False}, "cma": 0.1}),
    case("meta_global", kind="meta"),
    case("meta_local_uneven_sum", kind="meta", sizes=(3, 5), normalize="sum", local_loss=True),
    case("shared_seed", seed=None),
    case("siglip_global", weights=True, terms={"siglip": {"weight": 1.0, "margin": 0.1}, "cma": 0.2}),
    case("siglip_local_uneven", sizes=(3, 5), weights=True, normalize="sum", local_loss=True,
         terms={"siglip": {"weight": 1.0, "margin": 0.1}, "m2mix": 0.5}),
    case("groups_global", groups=True),
    case("groups_local_uneven_weights", sizes=(5, 3), weights=True, local_loss=True, groups=True),
    case("groups_siglip_local", local_loss=True, groups=True, terms={"siglip": {"weight": 1.0, "margin": 0.2}}),
]
# the margin family: each term global and local (uneven, groups, weights), the terms reading norms through
# both gathers, Cam-Softmax at a step where its schedule has moved, and a meta case per term
MARGIN_TERMS = {
    "cosface": {"margin": 0.2, "detach": True},
    "arcface": {"margin": 0.3},
    "sphereface_r": {"margin": 1.5, "version": "v0"},
    "sphereface_r_soft": {"margin": 1.3, "version": "v2", "normalization": "soft", "norm_target": 3.0},
    "sphereface_r_none": {"margin": 1.3, "version": "v1", "normalization": "none", "detach": False},
    "cam_softmax": {"c_start": 1.5, "c_stop": 1.0, "c_decay": 0.01},
    "sface": {"scale": 8.0, "a": 1.0, "b": 1.5},
    "sphereface2": {"margin": 0.2, "t": 2.0, "variant": "C"},
}
for label, options in MARGIN_TERMS.items():
    term = {label.removesuffix("_soft").removesuffix("_none"): {"weight": 1.0, **options}}
    CASES += [
        case(f"{label}_global", terms={**term, "m2mix": 0.3}, step=40),
        case(f"{label}_local_uneven_groups_weights", sizes=(3, 5), weights=True, normalize="sum", local_loss=True,
             groups=True, terms=dict(term), step=40),
        case(f"{label}_meta_local", kind="meta", local_loss=True, terms=dict(term), step=40),
    ]
CASES.append(case("sphereface_r_soft_gather_without_grad", weights=True, gather_with_grad=False,
                  terms={"sphereface_r": {"weight": 1.0, **MARGIN_TERMS["sphereface_r_soft"]}}, step=3))


def make_data(total: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    return {
        "raw_image": randn(total, 6), "raw_text": randn(total, 6),
        "meta_raw_image": randn(total, 6), "meta_raw_text": randn(total, 6),
        "weights": torch.rand(total, generator=generator, dtype=torch.float64),
        "projection_image": randn(6, 4), "projection_text": randn(6, 4),
        "log_scale": torch.tensor(2.0, dtype=torch.float64), "theta": torch.tensor(0.3, dtype=torch.float64),
        "logit_bias": torch.tensor(-1.5, dtype=torch.float64),
        # samples 0, 3, 5 share a group, as do 1 and 6, across the ranks' slices
        "groups": torch.tensor([7, 2, 9, 7, 4, 7, 2, 11]),
    }


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> tuple[dict, list[dict]]:
    """Run every case once in a 2-process gloo group; returns (data, per-rank results)."""
    directory = tmp_path_factory.mktemp("two_processes")
    data = make_data(8, torch.Generator().manual_seed(0))
    spec = directory / "spec.pt"
    torch.save({"data": data, "cases": CASES}, spec)
    port = free_port()
    environment = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    logs = [directory / f"rank{rank}.log" for rank in range(2)]
    processes = []
    # output goes to files: a full pipe would block one rank inside a collective and hang both
    for rank, log in enumerate(logs):
        with log.open("w") as handle:
            processes.append(subprocess.Popen(
                [sys.executable, str(WORKER), str(spec), str(directory), str(rank), "2", str(port)],
                cwd=REPO, env=environment, stdout=handle, stderr=subprocess.STDOUT))
    try:
        for process in processes:
            process.wait(timeout=180)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    for rank, (process, log) in enumerate(zip(processes, logs)):
        assert process.returncode == 0, f"rank {rank} failed:\n{log.read_text()}"
    return data, [torch.load(directory / f"rank{rank}.pt", weights_only=True) for rank in range(2)]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-11, msg=lambda message: f"{what}: {message}")


@pytest.mark.parametrize("spec", [spec for spec in CASES if spec["kind"] == "step" and spec["seed"] is not None],
                         ids=lambda spec: spec["name"])
def test_step_equals_one_process(two_processes, spec):
    data, ranks = two_processes
    reference = run_case(spec, data, 0, [sum(spec["sizes"])])
    for rank, results in enumerate(ranks):
        result = results[spec["name"]]
        assert_close(result["loss"], reference["loss"], f"rank {rank} loss")
        assert result["terms"].keys() == reference["terms"].keys()
        for name, value in reference["terms"].items():
            assert_close(result["terms"][name], value, f"rank {rank} term {name}")
        start = sum(spec["sizes"][:rank])
        assert_close(result["per_sample"], reference["per_sample"][start:start + spec["sizes"][rank]],
                     f"rank {rank} per_sample")
        for name, gradient in reference["gradients"].items():
            assert_close(result["gradients"][name], gradient, f"rank {rank} gradient of {name}")


@pytest.mark.parametrize("spec", [spec for spec in CASES if spec["kind"] == "meta"], ids=lambda spec: spec["name"])
def test_meta_gradient_equals_one_process(two_processes, spec):
    data, ranks = two_processes
    reference = run_case(spec, data, 0, [sum(spec["sizes"])])
    assert reference["theta_gradient"].abs() > 0  # the check below would pass vacuously otherwise
    for rank, results in enumerate(ranks):
        for key in ("virtual_loss", "meta_loss", "theta_gradient"):
            assert_close(results[spec["name"]][key], reference[key], f"rank {rank} {key}")


def test_ranks_draw_the_same_values_without_a_seed(two_processes):
    _, ranks = two_processes
    first, second = (results["shared_seed"] for results in ranks)
    assert torch.isfinite(first["loss"])
    assert_close(first["loss"], second["loss"], "loss across ranks")
    for name in ("m2mix", "calibrated_uniformity"):
        assert_close(first["terms"][name], second["terms"][name], f"{name} across ranks")
