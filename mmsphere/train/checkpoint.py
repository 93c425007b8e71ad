"""Training state for resume, written without pickle and read without running code from the checkpoint.

A checkpoint is a directory of plain files, written into ``.tmp-step_<8-digit step>`` and renamed to
``step_<8-digit step>`` as the last thing that happens, so a run killed mid-write leaves only a
``.tmp-*`` directory that is never picked as ``latest``. It is complete exactly when it holds
``trainer_state.json``:

=================================  ==============================================================
``trainer_state.json``             step, data epoch, number of processes, format, the run's counters
                                   (:data:`STATE_KEYS`; main process)
``<name>.safetensors``             each checkpointed module: the model, the WeightNet (main process)
``<name>.frozen_base.json``        a model with frozen towers on a pretrained base: the reference to that
                                   base, whose tensors ``<name>.safetensors`` then leaves out
``<name>.pt``                      each optimiser's state dict, ``torch.save`` (main process)
``<name>.json``                    anything else with a state dict: the learning-rate schedule
``grad_scaler.json``               fp16's loss scale, when there is one
``rng_state_<process>.json``       each process's python, numpy, torch CPU and CUDA generators
``data_position_<process>.json``   each process's data streams (:meth:`mmsphere.data.TrainStream.state_dict`)
=================================  ==============================================================

Nothing is ever unpickled in full: safetensors and JSON files are parsed, ``.pt`` files are read
with ``torch.load(weights_only=True)``, which rebuilds tensors and plain containers only. A file that
would need more (a ``__reduce__`` payload, a pickled object) or that is damaged stops the resume
with a :class:`~mmsphere.errors.DataError` naming it, before anything from it is used; a trainer
state with a key missing or of the wrong type names the key too.

A frozen-tower run (:mod:`mmsphere.models.frozen_base`) saves its model's trained tensors only; resuming
checks that the base the run's ``model.pretrained`` built is the recorded one (by its digest) before
loading them on top, and stops with one line naming the base when it is not.

Checkpoints from before this format (``accelerator.save_state``: ``optimizer.bin``,
``custom_checkpoint_<i>.pkl``, ``random_states_<process>.pkl``) still resume: every file is read
the same way, with numpy's arrays allowed for the RNG state, and refused likewise.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_model

from mmsphere.atomic import atomic_write
from mmsphere.console import ON_CONSOLE
from mmsphere.errors import DataError, MmsphereError
from mmsphere.models.dual_encoder import DualEncoder
from mmsphere.models.frozen_base import base_reference, check_base, check_reference, load_trained, save_trained

logger = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
DATA_POSITION_FILE = "data_position_{}.json"
RNG_STATE_FILE = "rng_state_{}.json"
GRAD_SCALER_FILE = "grad_scaler.json"
FROZEN_BASE_FILE = "{}.frozen_base.json"
FORMAT = 2  # 1 (no "format" key): accelerate's save_state, with pickle files

# the pre-2 layout: accelerate's names, and the order the loop registered its objects in
LEGACY_OPTIMIZER_FILE = "optimizer.bin"
LEGACY_CUSTOM_OBJECTS = ("scheduler", "weight_net", "weight_net_optimizer")  # custom_checkpoint_<index>.pkl
LEGACY_RNG_STATE_FILE = "random_states_{}.pkl"
LEGACY_SCALER_FILE = "scaler.pt"
DATA_PARALLEL_PREFIX = "module."

# what trainer_state.json holds: key -> (kind of value, required). The counters of the run's summary.json
# (mmsphere.train.loop) are absent from checkpoints written before they were saved, "processes" and "format"
# from accelerate's (format 1); keys not named here are left alone
STATE_KEYS: dict[str, tuple[str, bool]] = {
    "step": ("count", True),
    "data_epoch": ("count", True),
    "processes": ("positive", False),
    "format": ("positive", False),
    "nonfinite_steps_skipped": ("count", False),
    "meta_iterations_skipped": ("count", False),
    "skipped_samples": ("counts", False),  # reason -> count, summed over every process
    "max_loss_seen": ("number", False),
}
_KIND_WORDS = {"count": "a non-negative integer", "positive": "a positive integer",
               "counts": "an object of non-negative integers", "number": "a finite number"}


def checkpoint_dir(output_dir: str | Path) -> Path:
    """Where the checkpoints of a run live."""
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = checkpoint_dir(output_dir)
    if not root.is_dir():
        return []
    complete = [path for path in root.glob("step_*") if (path / STATE_FILE).is_file()]
    return sorted(complete, key=lambda path: int(path.name.split("_")[1]))


def resolve_resume(output_dir: str | Path, resume: str | None) -> Path | None:
    """The checkpoint ``train.resume`` names: a path, ``latest`` (None when there is none yet) or null."""
    if resume is None:
        return None
    if resume == "latest":
        checkpoints = list_checkpoints(output_dir)
        return checkpoints[-1] if checkpoints else None
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise DataError(f"train.resume={resume!r} is not a complete checkpoint (no {STATE_FILE})")
    return path


def discard_partial_checkpoints(output_dir: str | Path) -> None:
    """Remove what a checkpoint write cut short (Ctrl-C) left: its ``.tmp-*`` directory (main process only)."""
    for partial in checkpoint_dir(output_dir).glob(".tmp-*"):
        shutil.rmtree(partial, ignore_errors=True)


def save_checkpoint(accelerator: Accelerator, output_dir: str | Path, step: int, state: dict[str, Any],
                    objects: dict[str, Any], keep: int, data_position: dict[str, Any] | None = None) -> Path:
    """Save the full training state atomically; every process must call this.

    ``state``: the run's JSON state (the main process writes it); ``objects``: name → module,
    optimiser or other object with a ``state_dict`` (identical on every process; the main process
    writes them); ``data_position``: this process's own.
    """
    root = checkpoint_dir(output_dir)
    final = root / f"step_{step:08d}"
    temporary = root / f".tmp-step_{step:08d}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        for name, obj in objects.items():
            _save_object(temporary, name, obj)
        if accelerator.scaler is not None:
            _write_json(temporary / GRAD_SCALER_FILE, accelerator.scaler.state_dict())
    _write_json(temporary / RNG_STATE_FILE.format(accelerator.process_index), _rng_state())
    if data_position is not None:
        _write_json(temporary / DATA_POSITION_FILE.format(accelerator.process_index), data_position)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _write_json(temporary / STATE_FILE,
                    {"step": step, **state, "processes": accelerator.num_processes, "format": FORMAT}, indent=2)
        if final.exists():
            shutil.rmtree(final)
        os.replace(temporary, final)
        for old in list_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        logger.info("saved checkpoint %s", final, extra=ON_CONSOLE)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Accelerator, path: str | Path, objects: dict[str, Any]) -> dict[str, Any]:
    """Restore ``objects`` (as given to :func:`save_checkpoint`), the loss scale and this process's RNG from ``path``.

    Returns the trainer state; ``state["data_position"]`` is this process's data position, or None
    when the checkpoint has none for it (written before positions were saved, or by fewer processes).
    Raises :class:`DataError` naming the file when any file is missing, damaged or would need unpickling.
    """
    path = Path(path)
    state = _check_state(path / STATE_FILE, _read_json(path / STATE_FILE))
    if state.get("format", 1) == 1:
        _load_legacy(accelerator, path, objects)
    elif state["format"] == FORMAT:
        for name, obj in objects.items():
            _load_object(path, name, obj)
        if accelerator.scaler is not None:
            _restore(path / GRAD_SCALER_FILE, accelerator.scaler, _read_json(path / GRAD_SCALER_FILE))
        rng_file = path / RNG_STATE_FILE.format(accelerator.process_index)
        if rng_file.is_file() or accelerator.process_index < state.get("processes", 1):
            _set_rng_state(rng_file, _read_json(rng_file))
        else:
            _warn_no_rng_state(rng_file, accelerator.process_index)
    else:
        raise DataError(f"checkpoint {path} has format {state['format']!r}, which this version of mmsphere "
                        f"does not know (it writes and reads {FORMAT}); resume it with the version that wrote it")
    position = path / DATA_POSITION_FILE.format(accelerator.process_index)
    state["data_position"] = _read_json(position) if position.is_file() else None
    return state


def _check_state(file: Path, state: Any) -> dict[str, Any]:
    """``state`` if every key of :data:`STATE_KEYS` it must hold is there and each holds its kind of value."""
    if not isinstance(state, dict):
        raise DataError(f"checkpoint file {file} is damaged: it holds a JSON {type(state).__name__}, not an object")
    for key, (kind, required) in STATE_KEYS.items():
        if key not in state:
            if required:
                raise DataError(f"checkpoint file {file} is damaged: it has no {key!r}")
            continue
        if not _is_kind(state[key], kind):
            shown = json.dumps(state[key])
            shown = shown if len(shown) <= 60 else shown[:57] + "..."
            raise DataError(f"checkpoint file {file} is damaged: {key!r} is {shown}, not {_KIND_WORDS[kind]}")
    return state


def _is_kind(value: Any, kind: str) -> bool:
    def count(item: Any) -> bool:
        return isinstance(item, int) and not isinstance(item, bool) and item >= 0

    if kind == "count":
        return count(value)
    if kind == "positive":
        return count(value) and value > 0
    if kind == "counts":
        return isinstance(value, dict) and all(count(item) for item in value.values())
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# ------------------------------------------------------------------------------------------
# one object: a module in safetensors, an optimiser through torch.save, anything else in JSON


def _save_object(directory: Path, name: str, obj: Any) -> None:
    reference = base_reference(obj) if isinstance(obj, DualEncoder) else None
    if reference is not None:
        # the frozen towers are the pretrained source's: only what trains, and where the rest comes from
        with atomic_write(directory / f"{name}.safetensors") as temporary:
            save_trained(obj, temporary, reference)
        _write_json(directory / FROZEN_BASE_FILE.format(name), reference, indent=2)
    elif isinstance(obj, torch.nn.Module):
        # tied weights are written once; through atomic_write for the umask's mode (save_model writes 0600)
        with atomic_write(directory / f"{name}.safetensors") as temporary:
            save_model(obj, str(temporary))
    elif isinstance(obj, torch.optim.Optimizer):
        torch.save(obj.state_dict(), directory / f"{name}.pt")
    else:
        _write_json(directory / f"{name}.json", obj.state_dict())


def _load_object(directory: Path, name: str, obj: Any) -> None:
    base_file = directory / FROZEN_BASE_FILE.format(name)
    if base_file.is_file():
        _load_trained(directory, name, obj, base_file)
    elif isinstance(obj, torch.nn.Module):
        file = directory / f"{name}.safetensors"
        _check_exists(file)
        try:
            load_model(obj, str(file), strict=True, device="cpu")
        except (SafetensorError, OSError, RuntimeError, ValueError, KeyError) as error:
            raise DataError(f"checkpoint file {file} cannot be loaded into the {name}: "
                            f"{_first_line(error)}") from None
    elif isinstance(obj, torch.optim.Optimizer):
        file = directory / f"{name}.pt"
        _restore(file, obj, _read_tensors(file))
    else:
        file = directory / f"{name}.json"
        _restore(file, obj, _read_json(file))


def _load_trained(directory: Path, name: str, obj: Any, base_file: Path) -> None:
    """A frozen-tower model: check that ``obj``'s frozen base is the recorded one, then load the trained tensors."""
    if not isinstance(obj, DualEncoder):
        raise DataError(f"checkpoint file {base_file} belongs to a dual encoder with frozen towers, "
                        f"not to the {name} ({type(obj).__name__}) of this run")
    reference = _read_json(base_file)
    where = f"checkpoint {directory}"
    check_reference(reference, where)
    # the run built its model from its own model.pretrained: resuming needs the base the checkpoint was trained on
    check_base(obj, reference, where)
    file = directory / f"{name}.safetensors"
    _check_exists(file)
    try:
        load_trained(obj, file)
    except MmsphereError as error:
        raise DataError(f"checkpoint file {file} cannot be loaded into the {name}: {_first_line(error)}") from None


def _restore(file: Path, obj: Any, state: Any) -> None:
    """``obj.load_state_dict(state)``, a state that does not fit being the file's fault."""
    try:
        obj.load_state_dict(state)
    except (KeyError, ValueError, TypeError, RuntimeError, AttributeError, IndexError) as error:
        raise DataError(f"checkpoint file {file} does not fit this run: {_first_line(error)}") from None


# ------------------------------------------------------------------------------------------
# random number generators: each process's own, as JSON


def _rng_state() -> dict[str, Any]:
    version, internal, gauss_next = random.getstate()
    generator, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    state = {"python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
             "numpy": {"generator": generator, "keys": keys.tolist(), "position": int(position),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
             "torch": torch.get_rng_state().numpy().tobytes().hex()}
    if torch.cuda.is_available():
        state["cuda"] = [device_state.numpy().tobytes().hex() for device_state in torch.cuda.get_rng_state_all()]
    return state


def _set_rng_state(file: Path, state: Any) -> None:
    """Restore every generator from ``state``; a malformed state is a damaged ``file``, never skipped."""
    try:
        python, numpy_state = state["python"], state["numpy"]
        python_state = (python["version"], tuple(python["internal"]), python["gauss_next"])
        numpy_state = (numpy_state["generator"], np.array(numpy_state["keys"], dtype=np.uint32),
                       numpy_state["position"], numpy_state["has_gauss"], numpy_state["cached_gaussian"])
        torch_state = _bytes_tensor(state["torch"])
        cuda_states = [_bytes_tensor(device_state) for device_state in state.get("cuda", [])]
        random.setstate(python_state)
        np.random.set_state(numpy_state)
        torch.set_rng_state(torch_state)
    except (KeyError, TypeError, ValueError, OverflowError, RuntimeError) as error:
        raise DataError(f"checkpoint file {file} is damaged: not a random-number-generator state "
                        f"({_first_line(error)}); an exact resume needs it") from None
    _set_cuda_rng_state(file, cuda_states)


def _bytes_tensor(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray.fromhex(text), dtype=torch.uint8).clone()


def _set_cuda_rng_state(file: Path, states: list[torch.Tensor]) -> None:
    devices = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if states and len(states) != devices:
        logger.warning("checkpoint file %s holds the CUDA generators of %d device(s), this process sees %d: "
                       "random draws on the GPU will differ from the interrupted run's", file, len(states), devices)
    for device, device_state in enumerate(states[:devices]):
        torch.cuda.set_rng_state(device_state, device)


def _warn_no_rng_state(file: Path, process: int) -> None:
    # more processes than wrote the checkpoint: the data positions are missing too, nothing is exact
    logger.warning("checkpoint holds no random-number-generator state for process %d (no %s): its generators "
                   "keep their fresh seed and the resume is not exact", process, file.name)


# ------------------------------------------------------------------------------------------
# checkpoints written by accelerator.save_state (format 1)


def _load_legacy(accelerator: Accelerator, path: Path, objects: dict[str, Any]) -> None:
    """Restore a checkpoint of accelerate's layout, every file through the readers above."""
    for name, obj in objects.items():
        if name == "model":
            file = path / "model.safetensors"
            state = _read_safetensors(file)
            if state and all(key.startswith(DATA_PARALLEL_PREFIX) for key in state):
                state = {key[len(DATA_PARALLEL_PREFIX):]: value for key, value in state.items()}
            _restore(file, obj, state)
        elif name == "optimizer":
            _restore(path / LEGACY_OPTIMIZER_FILE, obj, _read_tensors(path / LEGACY_OPTIMIZER_FILE))
        elif name in LEGACY_CUSTOM_OBJECTS:
            file = path / f"custom_checkpoint_{LEGACY_CUSTOM_OBJECTS.index(name)}.pkl"
            _restore(file, obj, _read_tensors(file))
        else:
            raise DataError(f"checkpoint {path} was written by an older mmsphere that did not save the {name}")
    if accelerator.scaler is not None:
        _restore(path / LEGACY_SCALER_FILE, accelerator.scaler, _read_tensors(path / LEGACY_SCALER_FILE))
    file = path / LEGACY_RNG_STATE_FILE.format(accelerator.process_index)
    if not file.is_file():
        _warn_no_rng_state(file, accelerator.process_index)
        return
    # numpy's generator state is an array: allow exactly what rebuilds one (accelerate's own list)
    numpy_core = getattr(np, "_core", None) or np.core  # numpy 2 renamed it
    uint32_dtype = [np.dtypes.UInt32DType] if hasattr(np, "dtypes") else []
    with torch.serialization.safe_globals([numpy_core.multiarray._reconstruct, np.ndarray, np.dtype, *uint32_dtype]):
        saved = _read_tensors(file)
    try:
        state = {"python": {"version": saved["random_state"][0], "internal": saved["random_state"][1],
                            "gauss_next": saved["random_state"][2]},
                 "numpy": dict(zip(("generator", "keys", "position", "has_gauss", "cached_gaussian"),
                                   saved["numpy_random_seed"])),
                 "torch": saved["torch_manual_seed"].numpy().tobytes().hex(),
                 "cuda": [device_state.numpy().tobytes().hex() for device_state in saved.get("torch_cuda_manual_seed", [])]}
    except (KeyError, TypeError, IndexError, AttributeError) as error:
        raise DataError(f"checkpoint file {file} is damaged: not a random-number-generator state "
                        f"({_first_line(error)}); an exact resume needs it") from None
    _set_rng_state(file, state)


# ------------------------------------------------------------------------------------------
# reading files: parse, never unpickle; every failure names the file


def _check_exists(file: Path) -> None:
    if not file.is_file():
        raise DataError(f"checkpoint file {file} is missing: the checkpoint is incomplete")


def _read_json(file: Path) -> Any:
    _check_exists(file)
    try:
        return json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise DataError(f"checkpoint file {file} is damaged: not JSON ({_first_line(error)})") from None


def _read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    _check_exists(file)
    try:
        return load_file(str(file), device="cpu")
    except (SafetensorError, OSError, ValueError) as error:
        raise DataError(f"checkpoint file {file} is damaged: not a safetensors file "
                        f"({_first_line(error)})") from None


def _read_tensors(file: Path) -> Any:
    """A ``torch.save`` file of tensors and plain containers, read with ``weights_only=True``."""
    _check_exists(file)
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise DataError(f"refusing checkpoint file {file}: it holds more than tensors and plain values "
                        f"({_unpickler_reason(error)}), and loading it would mean unpickling, which can run "
                        f"code; mmsphere never unpickles a checkpoint") from None
    except (OSError, RuntimeError, ValueError, EOFError, KeyError, AttributeError) as error:
        raise DataError(f"checkpoint file {file} is damaged: not a torch tensor file "
                        f"({_first_line(error)})") from None


def _write_json(file: Path, value: Any, indent: int | None = None) -> None:
    file.write_text(json.dumps(value, indent=indent))


def _unpickler_reason(error: Exception) -> str:
    # torch's message is a page of advice to retry with weights_only=False; keep only the reason
    _, marker, rest = str(error).partition("WeightsUnpickler error:")
    reason = next((line.strip() for line in rest.splitlines() if line.strip()), "") if marker else ""
    return reason.split(" was not an allowed global")[0] if reason else _first_line(error)


def _first_line(error: Exception) -> str:
    return next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
