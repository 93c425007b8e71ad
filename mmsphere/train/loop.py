"""The fine-tuning loop: shard → decode → batch → encoders → features → objective → weights → step.

Read top to bottom: :func:`train` sets up, then each step takes a batch, optionally runs one meta
iteration of the WeightNet, computes the weighted objective, steps, logs and checkpoints. Helpers
sit below their caller.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, broadcast_object_list, gather_object
from tqdm.auto import tqdm

from mmsphere.cache import build_config_caches
from mmsphere.errors import ConfigError, MmsphereError
from mmsphere.train.config import Config
from mmsphere.console import ON_CONSOLE, process_rank, run_log_file
from mmsphere.data import Batch, TrainStream, build_train_stream, stats
from mmsphere.data.feature_files import FeatureCache
from mmsphere.data.modalities import MODALITY_REGISTRY
from mmsphere.eval.evaluate import evaluate_retrieval_loader
from mmsphere.losses import Objective
from mmsphere.train.checkpoint import discard_partial_checkpoints, list_checkpoints, load_checkpoint, save_checkpoint
from mmsphere.train.optim import build_optimizer, cosine_schedule
from mmsphere.train.preflight import check_data_sources, check_output_dir, check_shared_output_dir, write_run_config
from mmsphere.train.run_log import RunLog, check_trackers
from mmsphere.train.step import StepResult, optimization_step
from mmsphere.train.task import Task
from mmsphere.weighting import MetaWeighting

logger = logging.getLogger(__name__)



class NonFiniteLossError(MmsphereError, RuntimeError):
    """Too many non-finite losses in a row: the run stops, its last good checkpoint intact."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped the run; ``checkpoint`` is the last complete one (None: none yet), where ``train.resume=latest`` continues."""

    def __init__(self, output_dir: Path, checkpoint: Path | None) -> None:
        where = f"from {checkpoint}" if checkpoint is not None else "from the start (no checkpoint yet)"
        super().__init__(f"training interrupted; train.resume=latest output_dir={output_dir} continues {where}")
        self.output_dir = output_dir
        self.checkpoint = checkpoint


def train(config: Config) -> dict[str, Any]:
    """Fine-tune the dual encoder described by ``config``; returns the run summary.

    Ctrl-C (``KeyboardInterrupt``) stops the run cleanly: a checkpoint half written is discarded,
    so the last complete one is where ``train.resume=latest`` continues, and
    :class:`TrainingInterrupted` names it. While the run lasts, every log record this process lets
    through also goes to the run's ``train.log`` (:func:`mmsphere.console.run_log_file`).
    """
    with contextlib.ExitStack() as stack:
        try:
            return _train(config, stack)
        except KeyboardInterrupt:
            # no collective from here on: the other processes are being interrupted too
            output_dir = Path(config.output_dir)
            if (dist.get_rank() if dist.is_available() and dist.is_initialized() else process_rank()) == 0:
                discard_partial_checkpoints(output_dir)
            checkpoints = list_checkpoints(output_dir)
            logger.info("interrupted; last complete checkpoint: %s", checkpoints[-1] if checkpoints else "none")
            raise TrainingInterrupted(output_dir, checkpoints[-1] if checkpoints else None) from None
        except Exception as error:
            # for the run's log file: the terminal gets the error from whoever handles it
            logger.info("run stopped: %s: %s", type(error).__name__, error, exc_info=not isinstance(error, MmsphereError))
            raise


def _train(config: Config, stack: contextlib.ExitStack) -> dict[str, Any]:
    """data -> task -> step -> log -> checkpoint; each stage is a helper below."""
    run = _open_run(config, stack)
    task, optimizer, checkpointed = _build_task(config, run)
    state = _resume(run, checkpointed)
    streams = _build_streams(config, run, task.network, state)
    train_batches = _epochs(streams["train"])
    meta_batches = _epochs(streams["meta"]) if "meta" in streams else None
    log = RunLog(run.output_dir, run.accelerator, config)  # starts the train.report_to trackers
    if state is not None:
        run.nonfinite_total, run.meta_skipped = _restore_counters(state, run.resume_from, run.skipped, log,
                                                                  run.accelerator.is_main_process)
    progress = tqdm(total=config.train.max_steps, initial=run.step, disable=not run.accelerator.is_main_process,
                    desc="train", unit="step", dynamic_ncols=True)
    stack.callback(progress.close)  # also when the run stops: an error or Ctrl-C then prints below the bar
    run.started = time.time()
    while run.step < config.train.max_steps:
        run.data_epoch, batch = next(train_batches)
        batch = batch.to(run.accelerator.device)
        meta_batch = None
        if meta_batches is not None and run.step % config.meta.interval == 0:
            meta_batch = next(meta_batches)[1].to(run.accelerator.device)
        outcome = optimization_step(task, batch, optimizer, meta_batch=meta_batch, step=run.step)
        if not _count_step(run, outcome):
            continue
        progress.update(1)
        _log_step(run, task, log, batch, outcome, progress)
        if config.data.val is not None and config.train.val_every and run.step % config.train.val_every == 0:
            log.metrics({"step": run.step, **validate(task.network, config, run.accelerator, run.val_cache)})
        if run.step % config.train.checkpoint_every == 0 or run.step == config.train.max_steps:
            save_checkpoint(run.accelerator, run.output_dir, run.step,
                            {"data_epoch": run.data_epoch, **_counters(run), "max_loss_seen": log.max_loss_seen},
                            checkpointed, keep=config.train.keep_checkpoints,
                            data_position={name: stream.state_dict() for name, stream in streams.items()})
    progress.close()
    return _finish(run, task, log)


@dataclass
class _Run:
    """One process's view of a run: its accelerator, directory, feature caches and counters."""

    config: Config
    accelerator: Accelerator
    output_dir: Path
    resume_from: Path | None
    owns_process_group: bool  # torch.distributed set up here, so torn down at the end
    local_batch: int
    meta_local: int | None
    skipped: stats.SkipTally = field(default_factory=stats.SkipTally)  # this run's, not the process's
    feature_caches: dict[str, FeatureCache] | None = None
    val_cache: FeatureCache | None = None
    step: int = 0
    data_epoch: int = 0
    resumed_from_step: int | None = None
    nonfinite_in_row: int = 0
    nonfinite_total: int = 0
    meta_skipped: int = 0
    samples_seen: int = 0
    started: float = 0.0


def _open_run(config: Config, stack: contextlib.ExitStack) -> _Run:
    """Everything before the model: the accelerator, the batch sizes and data checked, the run directory claimed, its log."""
    # a caller that set up torch.distributed itself (a test harness, a sweep over runs) keeps its
    # process group; one that accelerate creates here is torn down at the end
    owns_process_group = not (dist.is_available() and dist.is_initialized())
    accelerator = build_accelerator(config)
    world_size, rank = accelerator.num_processes, accelerator.process_index
    local_batch = local_batch_size(config.train.batch_size, world_size, config.train.accum_freq)
    meta_local = None
    if config.meta.enabled:
        meta_local = local_batch_size(config.meta.batch_size or config.train.batch_size, world_size,
                                      key="meta.batch_size" if config.meta.batch_size else "train.batch_size")
    check_data_sources(config)
    output_dir = Path(config.output_dir)
    resume_from = check_output_dir(config)
    # every rank must look before rank 0 writes config.yaml, or a slower rank takes it for an old run
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_run_config(config)
    accelerator.wait_for_everyone()
    check_shared_output_dir(accelerator, output_dir, resume_from)
    log_file = stack.enter_context(run_log_file(output_dir, rank))
    logger.info("run directory %s (log: %s)", output_dir, log_file, extra=ON_CONSOLE)
    return _Run(config, accelerator, output_dir, resume_from, owns_process_group, local_batch, meta_local)


def _build_task(config: Config, run: _Run) -> tuple[Task, torch.optim.Optimizer, dict[str, Any]]:
    """The task (model prepared, objective, meta weighting), its optimiser, and what a checkpoint restores."""
    # lazy: mmsphere.models imports open_clip (seconds); `mmsphere train --help` imports this package
    from mmsphere.models import create_run_model
    from mmsphere.models.frozen_base import log_saved_weights

    accelerator = run.accelerator
    model = create_run_model(config)  # seeded: identical initialisation on every rank, and in `mmsphere cache`
    if not config.model.pretrained and run.resume_from is None:
        logger.info("training %s from random initialisation (model.pretrained is not set)", config.model.name,
                    extra=ON_CONSOLE)
    if accelerator.is_main_process:
        log_saved_weights(model)  # frozen towers: a reference to their base, or (random ones) the full weights
    objective = Objective(config.loss)
    optimizer = build_optimizer(model, config)
    scheduler = cosine_schedule(optimizer, config.train.warmup_steps, config.train.max_steps)
    if accelerator.num_processes > 1:
        configure_ddp(accelerator, model, objective, config)
    model, optimizer = accelerator.prepare(model, optimizer)
    network = accelerator.unwrap_model(model)
    # what a checkpoint restores besides the trainer state (no pickle: mmsphere/train/checkpoint.py); the
    # scheduler is not prepared: accelerate would step it once per process
    checkpointed = {"model": network, "optimizer": optimizer, "scheduler": scheduler}
    if config.data.feature_cache:
        # frozen trunks: each process encodes its share of the missing shards, then all read every shard
        run.feature_caches, run.val_cache = build_config_caches(
            network, config, rank=accelerator.process_index, world_size=accelerator.num_processes,
            progress=accelerator.is_main_process)
        accelerator.wait_for_everyone()
    weighting = MetaWeighting(config, network, objective) if config.meta.enabled else None
    if weighting is not None:
        weighting.weight_net.to(accelerator.device)
        checkpointed.update(weight_net=weighting.weight_net, weight_net_optimizer=weighting.optimizer)
    task = Task.from_config(config, network, accelerator, model=model, objective=objective, weighting=weighting,
                            scheduler=scheduler)
    return task, optimizer, checkpointed


def _resume(run: _Run, checkpointed: dict[str, Any]) -> dict[str, Any] | None:
    """Restore the checkpoint ``run`` resumes from (None: a fresh run) into ``checkpointed``; its trainer state."""
    if run.resume_from is None:
        return None
    state = load_checkpoint(run.accelerator, run.resume_from, checkpointed)
    run.step, run.data_epoch = state["step"], state["data_epoch"] + 1
    run.resumed_from_step = run.step
    logger.info("resumed from %s at step %d", run.resume_from, run.step, extra=ON_CONSOLE)
    return state


def _build_streams(config: Config, run: _Run, network: torch.nn.Module,
                   state: dict[str, Any] | None) -> dict[str, TrainStream]:
    """This process's training stream (and meta stream), where the checkpoint left them when resuming."""
    accelerator = run.accelerator
    common = dict(image_size=network.image_size, image_mean=network.image_mean, image_std=network.image_std,
                  tokenizer=network.tokenizer, rank=accelerator.process_index, world_size=accelerator.num_processes,
                  seed=config.seed, feature_caches=run.feature_caches, positives=config.loss.positives,
                  skipped=run.skipped, tokenize_cached=config.model.trainable_blocks is not None)
    streams = {"train": build_train_stream(config.data.train, config.data, batch_size=run.local_batch,
                                           split="train", **common)}
    if config.meta.enabled:
        streams["meta"] = build_train_stream([config.data.meta], config.data, batch_size=run.meta_local,
                                             split="meta", **common)
    if state is not None:
        _resume_streams(streams, state["data_position"], next_epoch=run.data_epoch)
    return streams


def _count_step(run: _Run, outcome: StepResult) -> bool:
    """Count the step's outcome; False when it was skipped (non-finite loss), which stops the run after too many."""
    config = run.config
    if outcome.meta is not None and outcome.meta.skipped:
        run.meta_skipped += 1
        logger.warning("non-finite value in the meta iteration at step %d: WeightNet not updated", run.step)
    if outcome.skipped:
        run.nonfinite_in_row += 1
        run.nonfinite_total += 1
        logger.warning("non-finite loss at step %d: step skipped (%d in a row)", run.step, run.nonfinite_in_row)
        if run.nonfinite_in_row >= config.train.max_nonfinite_steps:
            checkpoints = list_checkpoints(run.output_dir)
            raise NonFiniteLossError(
                f"{run.nonfinite_in_row} non-finite losses in a row at step {run.step}; stopping. The last good "
                f"checkpoint is {checkpoints[-1] if checkpoints else 'none'}")
        return False
    run.nonfinite_in_row = 0
    run.step += 1
    run.samples_seen += config.train.batch_size
    return True


def _log_step(run: _Run, task: Task, log: RunLog, batch: Batch, outcome: StepResult, progress: tqdm) -> None:
    """The sample weights (meta weighting) and, every ``train.log_every`` steps, the step's metrics."""
    config, step, result, meta_result = run.config, run.step, outcome.output, outcome.meta
    if task.weighting is not None:
        log.max_loss_seen = max(log.max_loss_seen, result.per_sample.detach().float().max().item())
        if step % config.meta.weights_log_every == 0 or step == config.train.max_steps:
            log.sample_weights(step, batch.keys, result.per_sample.detach(), result.weights)
    if step % config.train.log_every == 0 or step == config.train.max_steps:
        rate = run.samples_seen / max(time.time() - run.started, 1e-9)
        record = {"step": step, "epoch": run.data_epoch, "lr": task.scheduler.get_last_lr()[0],
                  "logit_scale": task.network.log_logit_scale.exp().item(), "samples_per_s": rate,
                  **{f"loss/{name}": value.item() for name, value in result.terms.items()}}
        if meta_result is not None:
            record.update({"meta/virtual_loss": meta_result.virtual_loss, "meta/meta_loss": meta_result.meta_loss,
                           "meta/weight_mean": meta_result.weight_mean})
        log.metrics(record)
        progress.set_postfix(loss=f"{result.terms['total'].item():.3f}", samples_s=f"{rate:.1f}")


def _finish(run: _Run, task: Task, log: RunLog) -> dict[str, Any]:
    """Final validation, the saved model, the weighting curve and summary.json; the run summary."""
    from mmsphere.models import save_run  # lazy, as in _build_task

    config, accelerator, output_dir = run.config, run.accelerator, run.output_dir
    summary = {"steps": run.step, "world_size": accelerator.num_processes, "resumed_from_step": run.resumed_from_step,
               "data_epoch": run.data_epoch, **_counters(run), "wall_time_s": time.time() - run.started}
    if config.data.val is not None:
        summary["validation"] = validate(task.network, config, accelerator, run.val_cache)
        log.metrics({"step": run.step, **summary["validation"]})
    if accelerator.is_main_process:
        save_run(task.network, config, output_dir)
        if task.weighting is not None:
            task.weighting.plot_curve(output_dir / "weighting_curve.png", log.max_loss_seen)
        (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        logger.info("run summary: %s", summary)  # the log file's copy; the CLI prints the summary itself
    accelerator.wait_for_everyone()
    if run.owns_process_group:
        accelerator.end_training()
    else:
        for tracker in accelerator.trackers:
            tracker.finish()
    return summary


# ------------------------------------------------------------------------------------------
# set-up


def build_accelerator(config: Config) -> Accelerator:
    """An Accelerator that really is distributed on CPU-only machines (gloo), mixed precision as asked."""
    cpu = config.train.cpu or not torch.cuda.is_available()
    if cpu and config.train.precision == "fp16":
        raise ConfigError("train.precision='fp16' needs a GPU; use 'bf16' or 'no' on CPU")
    # accelerate silently drops a tracker it cannot import; say so before any work instead
    check_trackers(config.train.report_to)
    # without cpu=True on a CUDA-less machine, accelerate treats each process as alone
    return Accelerator(
        cpu=cpu,
        mixed_precision=config.train.precision,
        log_with=config.train.report_to or None,
        project_dir=config.output_dir,
        # safe for any model and data (video and image batches use different parameters); train() narrows
        # it to what the run's model and data need (configure_ddp)
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )


def configure_ddp(accelerator: Accelerator, network: torch.nn.Module, objective: Objective, config: Config) -> None:
    """Have DDP look for parameters without a gradient after each backward only where some step leaves some.

    Without the search, DDP waits for every trainable parameter's gradient and fails at the next step
    when one never came; with it, every step walks the autograd graph and DDP warns when it finds
    nothing. So it is on exactly when :func:`parameters_without_gradient` finds any, before
    ``accelerator.prepare`` wraps the model. It must be on in a run that mixes video and image
    sources with a temporal head that has parameters (image batches bypass the head); there DDP
    still warns once, at the first video batch, which uses every parameter.
    """
    network.to(accelerator.device)  # where prepare() puts it anyway; the probe then runs there
    missing = parameters_without_gradient(network, objective, config)
    for name, why in missing.items():
        logger.info("DDP looks for unused parameters: %s gets no gradient from %s", name, why)
    accelerator.ddp_handler.find_unused_parameters = bool(missing)


def parameters_without_gradient(network: torch.nn.Module, objective: Objective, config: Config) -> dict[str, str]:
    """Trainable parameters of ``network`` that some step of this run gives no gradient, with the reason.

    A forward of each modality of ``data.train`` runs on a dummy one-sample batch (eval mode: no
    BatchNorm statistics change, no random draws) and its autograd graph is searched: the temporal
    head is missing from an image batch's (images bypass it), and so is any part of a tower that the
    encoders never run. The logit bias counts when no loss term reads it (a SigLIP checkpoint
    fine-tuned with the softmax loss). Meta batches do not count: the meta step runs outside DDP.
    """
    trainable = {name: parameter for name, parameter in network.named_parameters() if parameter.requires_grad}
    missing: dict[str, str] = {}
    device = next(network.parameters()).device
    was_training = network.training
    network.eval()
    try:
        for modality in sorted({source.modality for source in config.data.train}):
            reached = _parameters_reached(network(**_probe_inputs(network, modality, config.data.frames, device)))
            for name, parameter in trainable.items():
                if id(parameter) not in reached:
                    missing.setdefault(name, f"the forward of a {modality} batch")
    finally:
        network.train(was_training)
    bias = getattr(network.clip, "logit_bias", None)
    if bias is not None and bias.requires_grad and not objective.needs_logit_bias:
        missing.setdefault("clip.logit_bias", "the loss (no loss term reads the logit bias)")
    return missing


def _probe_inputs(network: torch.nn.Module, modality: str, frames: int, device: torch.device) -> dict[str, torch.Tensor]:
    size = network.image_size
    inputs = {"text": network.tokenizer(["a probe"]).to(device)}
    kind = MODALITY_REGISTRY[modality]
    length = kind.clip_length(frames)
    media = kind.stack([torch.zeros(length, 3, size, size, device=device)])
    return {**inputs, **kind.inputs(media, torch.ones(1, length, dtype=torch.bool, device=device), cached=False)}


def _parameters_reached(outputs: dict[str, torch.Tensor]) -> set[int]:
    """``id`` of every leaf tensor (parameter) the autograd graphs of ``outputs`` lead to."""
    reached: set[int] = set()
    seen: set[Any] = set()
    pending = [tensor.grad_fn for tensor in outputs.values() if tensor.grad_fn is not None]
    while pending:
        node = pending.pop()
        if node in seen:
            continue
        seen.add(node)
        if hasattr(node, "variable"):  # AccumulateGrad: the gradient of a leaf ends here
            reached.add(id(node.variable))
        pending.extend(next_node for next_node, _ in node.next_functions if next_node is not None)
    return reached


def local_batch_size(global_batch: int, world_size: int, accum_freq: int = 1, key: str = "train.batch_size") -> int:
    """Per-process share of the global batch; each process's micro-batches must hold at least 2 samples.

    The objective needs two samples per process (a positive and a negative), and accumulation splits
    each process's share into ``accum_freq`` equal micro-batches.
    """
    if global_batch % world_size:
        raise ConfigError(f"{key}={global_batch} must be a multiple of the number of processes ({world_size})")
    local = global_batch // world_size
    if local % accum_freq:
        raise ConfigError(f"{key}={global_batch} over {world_size} process(es) gives {local} samples per process, "
                          f"which train.accum_freq={accum_freq} cannot split into equal micro-batches; use a "
                          f"multiple of {world_size * accum_freq}")
    if local // accum_freq < 2:
        raise ConfigError(f"{key}={global_batch} over {world_size} process(es) and train.accum_freq={accum_freq} "
                          f"leaves {local // accum_freq} sample(s) per micro-batch; each needs at least 2: use at "
                          f"least {2 * world_size * accum_freq}")
    return local


def _resume_streams(streams: dict[str, Any], position: dict[str, Any] | None, next_epoch: int) -> None:
    """Put this process's data streams back where the checkpoint left them (finite shards: at the very next batch).

    A checkpoint without a position for this process (written before positions were saved, or by
    fewer processes) resumes each stream with a fresh ``next_epoch``, as resampled shards always do.
    """
    for name, stream in streams.items():
        if position is not None and name in position:
            stream.load_state_dict(position[name])
            continue
        if not stream.resampled:
            logger.warning("the checkpoint holds no %s data position for process %d; resuming with a fresh data "
                           "epoch %d instead of the rest of the interrupted one", name, stream.rank, next_epoch)
        stream.set_epoch(next_epoch)


def _epochs(stream: TrainStream) -> Iterator[tuple[int, Batch]]:
    """Endless (epoch, batch) pairs: each pass over ``stream`` is one (virtual) data epoch, reseeded by its number."""
    while True:
        epoch, produced = stream.epoch, False
        for batch in stream:
            produced = True
            yield epoch, batch
        if not produced:
            names = ", ".join(repr(source.name) for source in stream.sources)
            raise MmsphereError(f"the {stream.split} data stream over {names} produced no batch in epoch {epoch}: "
                                f"every sample was skipped or there are fewer samples than one batch")


def _skipped_everywhere(counts: dict[str, int]) -> dict[str, int]:
    total: dict[str, int] = {}
    for per_rank in gather_object([counts]) if dist.is_available() and dist.is_initialized() else [counts]:
        for reason, count in per_rank.items():
            total[reason] = total.get(reason, 0) + count
    return total


def _counters(run: _Run) -> dict[str, Any]:
    """The run's counters, as summary.json reports them and each checkpoint keeps them (every process calls this)."""
    return {"nonfinite_steps_skipped": run.nonfinite_total, "meta_iterations_skipped": run.meta_skipped,
            "skipped_samples": _skipped_everywhere(run.skipped.counts())}


def _restore_counters(state: dict[str, Any], checkpoint: Path, skipped: stats.SkipTally, log: RunLog,
                      is_main: bool) -> tuple[int, int]:
    """Take up the counters of the run up to ``checkpoint``: summary.json counts the whole run, not its resumed part.

    Returns the skipped steps and meta iterations. The skipped samples are every process's together,
    so the main process alone adds them; a resumed stream does not count again the skips in what it
    reads again to reach its position (:class:`mmsphere.data.stats.SkipCounter`'s ``replaying``).
    """
    if "nonfinite_steps_skipped" not in state:
        logger.warning("checkpoint %s holds no counters (written by an older mmsphere): summary.json counts "
                       "skipped steps and samples from the resume on only", checkpoint)
    if is_main:
        skipped.add(state.get("skipped_samples", {}))
    log.max_loss_seen = state.get("max_loss_seen", log.max_loss_seen)  # the weighting curve's range
    return state.get("nonfinite_steps_skipped", 0), state.get("meta_iterations_skipped", 0)


# ------------------------------------------------------------------------------------------
# validation (the run's logs and trackers: mmsphere/train/run_log.py)


def validate(network: torch.nn.Module, config: Config, accelerator: Accelerator,
             feature_cache: FeatureCache | None = None) -> dict[str, float]:
    """Retrieval metrics on the validation stream (main process; others wait), from ``feature_cache`` if given."""
    metrics: dict[str, float] = {}
    if accelerator.is_main_process:
        was_training = network.training
        network.eval()
        results = evaluate_retrieval_loader(network, config.data.val.urls, modality=config.data.val.modality,
                                            frames=config.data.frames, batch_size=config.train.batch_size,
                                            feature_cache=feature_cache)
        network.train(was_training)
        metrics = {f"val/{name}": value for name, value in results.items() if isinstance(value, (int, float))}
    if accelerator.num_processes > 1:
        # every process returns the same summary, not rank 0's metrics and an empty dict elsewhere
        metrics = broadcast_object_list([metrics], from_process=0)[0]
    return metrics
