"""The scenario matrix (tests/scenarios/matrix.py): real short training runs where features meet.

Each scenario must finish under a hard timeout (a hang fails with the scenario's name), end with
finite metrics and a finite model, report the skipped step when a NaN batch was injected, see both
modalities when its sources mix, and, where deterministic, give after 2 processes the loss and
parameters that 1 process gives on the concatenated batch. A scenario on a feature cache must read
the cache (its trunks never run after the build) and, run again in float32, match the same run
without the cache; one with group positives must see batches where samples share a group, and its
single-process objective must equal a loop transcription of the grouped loss.
"""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import torch
import webdataset as wds
from safetensors.torch import load_file

from mmsphere.data.h264 import x264_options
from tests.losses.test_functional import loop_angular_margin, loop_grouped_angular_margin, loop_siglip
from tests.scenarios.matrix import FACTORS, FAMILY, FAMILY_ROWS, MAX_STEPS, SCENARIOS, Scenario, pairwise
from tests.scenarios.matrix import TERMS as TERMS_BY_NAME
from tests.losses import margin_reference as R
from tests.train.conftest import write_image_text_shards

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
LAUNCH_TIMEOUT_S = 420  # per world size; each scenario also has its own watchdog in the worker

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}


def _clip(colour: tuple[int, int, int], direction: int, rng: np.random.Generator) -> bytes:
    """A real 5-frame 32x32 H.264 clip: a coloured square moving left or right."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=5)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        stream.options = x264_options(crf=23)
        for index in range(5):
            pixels = rng.integers(0, 40, (32, 32, 3)).astype(np.uint8)
            left = 4 + 4 * (index if direction > 0 else 4 - index)
            pixels[10:22, left:left + 8] = colour
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


def write_video_text_shards(directory: Path, prefix: str, shards: int, per_shard: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    names = list(COLOURS)
    for shard in range(shards):
        with wds.TarWriter(str(directory / f"{prefix}-{shard:06d}.tar")) as writer:
            for index in range(per_shard):
                colour, direction = names[rng.integers(len(names))], int(rng.choice([-1, 1]))
                caption = f"a {colour} square moving {'right' if direction > 0 else 'left'}"
                # the colour is the group (loss.positives=group): 4 groups, so a batch of 8 shares some
                writer.write({"__key__": f"{prefix}{shard:03d}_{index:04d}", "mp4": _clip(COLOURS[colour], direction, rng),
                              "json": json.dumps({"captions": [caption, f"{colour} block going "
                                                              f"{'right' if direction > 0 else 'left'}"],
                                                  "group": colour}).encode()})
    return str(directory / f"{prefix}-{{000000..{shards - 1:06d}}}.tar")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(processes: int, shards_file: Path, out: Path) -> dict:
    environment = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    environment.pop("CUDA_VISIBLE_DEVICES", None)
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
               "--master_addr=127.0.0.1", f"--master_port={_free_port()}",
               str(HERE / "worker.py"), str(shards_file), str(out)]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S, env=environment)
        returncode, stderr = result.returncode, result.stderr
    except subprocess.TimeoutExpired as error:
        returncode, stderr = "timeout", (error.stderr or b"").decode(errors="replace") if isinstance(
            error.stderr, bytes) else (error.stderr or "")
    started = (out / "started").read_text() if (out / "started").is_file() else "<none>"
    return {"returncode": returncode, "stderr": stderr, "unfinished": started}


@pytest.fixture(scope="module")
def matrix(tmp_path_factory) -> dict:
    """Shards, then one launch per world size; returns where each world size's results are."""
    root = tmp_path_factory.mktemp("matrix")
    shards = {"image": write_image_text_shards(root / "image", "image", shards=4, per_shard=16, seed=0, groups=True),
              "video": write_video_text_shards(root / "video", "video", shards=4, per_shard=12, seed=1),
              "meta_image": write_image_text_shards(root / "meta_image", "metaimage", shards=2, per_shard=12, seed=2,
                                                    groups=True),
              "meta_video": write_video_text_shards(root / "meta_video", "metavideo", shards=2, per_shard=12, seed=3)}
    shards_file = root / "shards.json"
    shards_file.write_text(json.dumps(shards))
    launches = {}
    for processes in (1, 2):
        out = root / f"world{processes}"
        out.mkdir()
        launches[processes] = {"out": out, **_launch(processes, shards_file, out)}
    return launches


def _result(matrix: dict, scenario: Scenario) -> dict:
    launch = matrix[scenario.processes]
    path = launch["out"] / f"{scenario.name}.json"
    if not path.is_file():
        where = ("it hung or crashed" if launch["unfinished"] == scenario.name
                 else f"the launch stopped earlier, in {launch['unfinished']!r}")
        pytest.fail(f"scenario {scenario.name} has no result: {where} (exit {launch['returncode']}); "
                    f"stderr tail:\n{launch['stderr'][-3000:]}")
    return json.loads(path.read_text())


def test_the_list_covers_every_pair_of_factor_values():
    rows = [vars(scenario) for scenario in SCENARIOS]
    for first, second in ((a, b) for i, a in enumerate(FACTORS) for b in list(FACTORS)[i + 1:]):
        for x in FACTORS[first]:
            for y in FACTORS[second]:
                assert any(row[first] == x and row[second] == y for row in rows), (first, x, second, y)
    assert pairwise() + FAMILY_ROWS == [vars(scenario) for scenario in SCENARIOS]  # deterministic


def test_every_margin_term_meets_two_processes_and_meta_weighting():
    for name in FAMILY:
        assert TERMS_BY_NAME[name][name]["weight"] == 1.0
        assert any(scenario.terms == name and scenario.processes == 2 and scenario.meta != "off"
                   and scenario.deterministic for scenario in SCENARIOS), name
    # and each of the factors' values still appears among them
    family = [scenario for scenario in SCENARIOS if scenario.terms in FAMILY]
    for factor in ("data", "meta_gradient", "precision", "tower", "accum_freq", "loss_mode", "positives", "trunks"):
        assert {getattr(scenario, factor) for scenario in family} == set(FACTORS[factor]), factor


@pytest.mark.slow
@pytest.mark.parametrize("scenario", SCENARIOS, ids=[scenario.name for scenario in SCENARIOS])
def test_scenario_trains_to_the_end(matrix, scenario):
    result = _result(matrix, scenario)
    summary = result["summary"]
    assert summary["steps"] == MAX_STEPS and summary["world_size"] == scenario.processes
    assert result["metrics_finite"] and result["model_finite"]
    expected_skips = 1 if scenario.nan_batch else 0
    assert summary["nonfinite_steps_skipped"] == expected_skips
    if scenario.meta != "off":
        assert summary["meta_iterations_skipped"] == expected_skips
        assert result["sample_weights"] > 0 and result["sample_weights_finite"]
    seen = set(result["modalities"])
    assert seen == ({"image", "video"} if scenario.data == "mixed" else {scenario.data})
    assert summary["skipped_samples"] == {}
    if scenario.positives == "group":
        assert result["shared_group_batches"] > 0  # positives beyond the diagonal, or group ids change nothing


DETERMINISTIC = [scenario for scenario in SCENARIOS if scenario.deterministic]


@pytest.mark.slow
@pytest.mark.parametrize("scenario", DETERMINISTIC, ids=[scenario.name for scenario in DETERMINISTIC])
def test_two_processes_equal_one_process(matrix, scenario):
    """And with meta weighting, the jvp meta-gradient equals the second-order one on 1 and on 2 processes."""
    saved = {}
    for processes in (1, 2):
        for gradient in ("jvp", "second_order") if scenario.meta != "off" else ("jvp",):
            path = matrix[processes]["out"] / f"{scenario.name}.world{processes}.{gradient}.pt"
            if not path.is_file():
                _result(matrix, scenario)  # fails with the launch's story
                pytest.fail(f"no equivalence step of {scenario.name} ({gradient}) on {processes} process(es)")
            saved[processes, gradient] = torch.load(path, weights_only=True)
    one = saved[1, "jvp"]
    for (processes, gradient), other in saved.items():
        where = f"{processes} process(es), meta.gradient={gradient}"
        assert other["losses"] == pytest.approx(one["losses"], rel=1e-9), where
        for name, value in one["parameters"].items():
            torch.testing.assert_close(other["parameters"][name], value, rtol=1e-8, atol=1e-10, msg=f"{where}: {name}")
        if one["weight_net"] is not None:
            for name, value in one["weight_net"].items():
                torch.testing.assert_close(other["weight_net"][name], value, rtol=1e-8, atol=1e-12,
                                           msg=f"{where}: {name}")


CACHED = [scenario for scenario in SCENARIOS if scenario.trunks == "frozen_cached"]
TRUNK_INPUTS = {"image_trunk", "frame_trunk"}
# metrics that are not results of the run (wall-clock rates)
TIMING = {"samples_per_s"}


@pytest.mark.slow
@pytest.mark.parametrize("scenario", CACHED, ids=[scenario.name for scenario in CACHED])
def test_a_cached_scenario_reads_the_cache_and_equals_the_uncached_run(matrix, scenario):
    """The trunks run only to build the cache; in float32, the cached run equals the same run decoding its shards."""
    result = _result(matrix, scenario)
    assert result["cache_built"], "the run never built (or found) its feature cache"
    assert result["trunk_runs_in_training"] == 0, "the trunks ran after the cache was built: it was not read"
    assert set(result["visual_inputs"]) <= TRUNK_INPUTS
    twin = result["cache_twin"]
    cached, uncached = twin["cached"], twin["uncached"]
    assert cached["trunk_runs_in_training"] == 0 and set(cached["visual_inputs"]) <= TRUNK_INPUTS
    # the comparison means something only if the other run really decoded and encoded
    assert uncached["trunk_runs_in_training"] > 0 and not set(uncached["visual_inputs"]) & TRUNK_INPUTS
    assert cached["batch_keys"] == uncached["batch_keys"]  # the same samples in the same batches
    assert cached["summary"]["nonfinite_steps_skipped"] == uncached["summary"]["nonfinite_steps_skipped"]
    out = matrix[scenario.processes]["out"]
    metrics = {kind: [json.loads(line) for line in (out / run["run"] / "metrics.jsonl").read_text().splitlines()]
               for kind, run in twin.items()}
    assert len(metrics["cached"]) == len(metrics["uncached"]) == MAX_STEPS
    for cached_record, uncached_record in zip(metrics["cached"], metrics["uncached"]):
        assert cached_record.keys() == uncached_record.keys()
        for name in cached_record.keys() - TIMING:
            assert cached_record[name] == pytest.approx(uncached_record[name], rel=1e-5, abs=1e-6), (
                f"step {cached_record['step']}: {name}")
    weights = {kind: load_file(str(out / run["run"] / "model.safetensors")) for kind, run in twin.items()}
    assert weights["cached"].keys() == weights["uncached"].keys()
    for name, value in weights["cached"].items():
        torch.testing.assert_close(value, weights["uncached"][name], rtol=1e-4, atol=1e-5, msg=name)


GROUPED = [scenario for scenario in DETERMINISTIC if scenario.positives == "group"]


@pytest.mark.slow
@pytest.mark.parametrize("scenario", GROUPED, ids=[scenario.name for scenario in GROUPED])
def test_group_positives_equal_the_loop_transcription(matrix, scenario):
    """The single process's grouped contrastive term on real features, against the float64 loop of its definition.

    With the 1-vs-2-process test above, the two-process run's group positives (ids gathered across
    the processes' halves) equal it too.
    """
    path = matrix[1]["out"] / f"{scenario.name}.world1.jvp.pt"
    if not path.is_file():
        _result(matrix, scenario)
        pytest.fail(f"no equivalence step of {scenario.name} on 1 process")
    reference = torch.load(path, weights_only=True)["group_reference"]
    groups = reference["group_ids"].tolist()
    assert len(set(groups)) < len(groups)  # several samples share a group
    image, text = reference["image_features"].tolist(), reference["text_features"].tolist()
    scale, options = float(reference["logit_scale"]), reference["options"]
    if reference["term"] == "siglip":
        expected = loop_siglip(image, text, scale, float(reference["logit_bias"]), options["margin"], groups)
        diagonal = loop_siglip(image, text, scale, float(reference["logit_bias"]), options["margin"])
    elif reference["term"] in FAMILY:
        expected, diagonal = (_margin_reference(reference, group_ids) for group_ids in (reference["group_ids"], None))
    else:
        assert reference["term"] == "angular_margin"
        expected = loop_grouped_angular_margin(image, text, scale, options["margin"], groups)
        diagonal = loop_angular_margin(image, text, scale, options["margin"])
    per_sample = reference["per_sample"]
    expected, diagonal = (torch.as_tensor(values, dtype=per_sample.dtype) for values in (expected, diagonal))
    torch.testing.assert_close(per_sample, expected, rtol=1e-9, atol=1e-12)
    # and the groups matter on these features: the diagonal loss is another value
    assert not torch.allclose(per_sample, diagonal, rtol=1e-3, atol=1e-6)


def _margin_reference(reference: dict, groups: torch.Tensor | None) -> torch.Tensor:
    """The loop transcription (tests/losses/margin_reference.py) of a margin term's per-sample values."""
    image, text, scale, o = reference["image_features"], reference["text_features"], reference["logit_scale"], \
        reference["options"]
    term = reference["term"]
    if term == "cosface":
        return R.cosface(image, text, scale, o["margin"], groups, o["detach"])
    if term == "arcface":
        return R.arcface(image, text, scale, o["margin"], o["fallback"], groups, o["detach"])
    if term == "sphereface_r":
        return R.sphereface_r(image, text, scale, o["margin"], o["version"], o["normalization"], groups, o["detach"],
                              norms=(reference["image_norms"], reference["text_norms"]),
                              norm_weight=o["norm_weight"], norm_target=o["norm_target"])
    if term == "cam_softmax":
        c = max(o["c_stop"], o["c_start"] - o["c_decay"] * reference["step"])  # c_start > c_stop here
        return R.cam_softmax(image, text, scale, c, groups, o["detach"])
    if term == "sface":
        return R.sface(image, text, o["scale"], o["k"], o["a"], o["b"], o["inter_reduction"], groups)
    assert term == "sphereface2"
    return R.sphereface2(image, text, scale, reference["logit_bias"], o["lam"], o["margin"], o["t"], o["variant"],
                         groups, o["detach"])
