"""The fine-tuning loop: shard → decode → batch → encoders → features → objective → weights → step.

Read top to bottom: :func:`train` sets up, then each step takes a batch, optionally runs one meta
iteration of the WeightNet, computes the weighted objective, steps, logs and checkpoints. Helpers
sit below their caller.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, broadcast_object_list, gather_object
from tqdm.auto import tqdm

from mmsphere.cache import FeatureCache, build_config_caches
from mmsphere.config import Config, ConfigError, MmsphereError
from mmsphere.console import ON_CONSOLE, process_rank, run_log_file
from mmsphere.data import build_train_stream, stats
from mmsphere.eval.evaluate import evaluate_retrieval_loader
from mmsphere.losses import Objective
from mmsphere.train.checkpoint import discard_partial_checkpoints, list_checkpoints, load_checkpoint, save_checkpoint
from mmsphere.train.optim import build_optimizer, cosine_schedule
from mmsphere.train.preflight import check_data_sources, check_output_dir, check_shared_output_dir, write_run_config
from mmsphere.train.run_log import RunLog, check_trackers
from mmsphere.train.step import optimization_step
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
    # lazy: mmsphere.models imports open_clip (seconds); `mmsphere train --help` imports this package
    from mmsphere.models import create_run_model, save_run

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

    model = create_run_model(config)  # seeded: identical initialisation on every rank, and in `mmsphere cache`
    if not config.model.pretrained and resume_from is None:
        logger.info("training %s from random initialisation (model.pretrained is not set)", config.model.name,
                    extra=ON_CONSOLE)
    objective = Objective(config.loss)
    optimizer = build_optimizer(model, config)
    scheduler = cosine_schedule(optimizer, config.train.warmup_steps, config.train.max_steps)
    if world_size > 1:
        configure_ddp(accelerator, model, objective, config)
    model, optimizer = accelerator.prepare(model, optimizer)
    network = accelerator.unwrap_model(model)
    # what a checkpoint restores besides the trainer state (no pickle: mmsphere/train/checkpoint.py); the
    # scheduler is not prepared: accelerate would step it once per process
    checkpointed = {"model": network, "optimizer": optimizer, "scheduler": scheduler}
    feature_caches = val_cache = None
    if config.data.feature_cache:
        # frozen trunks: each process encodes its share of the missing shards, then all read every shard
        feature_caches, val_cache = build_config_caches(network, config, rank=rank, world_size=world_size,
                                                        progress=accelerator.is_main_process)
        accelerator.wait_for_everyone()

    weighting = MetaWeighting(config, network, objective) if config.meta.enabled else None
    if weighting is not None:
        weighting.weight_net.to(accelerator.device)
        checkpointed.update(weight_net=weighting.weight_net, weight_net_optimizer=weighting.optimizer)

    step, data_epoch, resumed_from_step = 0, 0, None
    if resume_from is not None:
        state = load_checkpoint(accelerator, resume_from, checkpointed)
        step, data_epoch = state["step"], state["data_epoch"] + 1
        resumed_from_step = step
        logger.info("resumed from %s at step %d", resume_from, step, extra=ON_CONSOLE)

    stream_kwargs = dict(image_size=network.image_size, image_mean=network.image_mean,
                         image_std=network.image_std, tokenizer=network.tokenizer,
                         rank=rank, world_size=world_size, seed=config.seed, feature_caches=feature_caches)
    # skips are counted per run: a process that trains several times (the ablation tool) or also
    # validates must not report another run's skips
    skipped = stats.SkipTally()
    data_streams = {"train": build_train_stream(config.data.train, config.data, batch_size=local_batch,
                                                split="train", skipped=skipped, **stream_kwargs)}
    if weighting is not None:
        data_streams["meta"] = build_train_stream([config.data.meta], config.data, batch_size=meta_local,
                                                  split="meta", skipped=skipped, **stream_kwargs)
    if resume_from is not None:
        _resume_streams(data_streams, state["data_position"], next_epoch=data_epoch)
    train_batches = _epochs(data_streams["train"])
    meta_batches = _epochs(data_streams["meta"]) if weighting is not None else None

    log = RunLog(output_dir, accelerator, config)  # starts the train.report_to trackers
    nonfinite_in_row, nonfinite_total, meta_skipped = 0, 0, 0
    if resume_from is not None:
        nonfinite_total, meta_skipped = _restore_counters(state, resume_from, skipped, log, accelerator.is_main_process)
    samples_seen, started = 0, time.time()
    progress = tqdm(total=config.train.max_steps, initial=step, disable=not accelerator.is_main_process,
                    desc="train", unit="step", dynamic_ncols=True)
    stack.callback(progress.close)  # also when the run stops: an error or Ctrl-C then prints below the bar
    while step < config.train.max_steps:
        data_epoch, batch = next(train_batches)
        inputs = model_inputs(batch, accelerator.device)
        group_ids = batch_group_ids(batch, config, accelerator.device)
        step_seed = config.seed * 1_000_003 + step  # same draws on every rank and every micro-batch

        meta_inputs = meta_group_ids = None
        if weighting is not None and step % config.meta.interval == 0:
            _, meta_batch = next(meta_batches)
            meta_inputs = model_inputs(meta_batch, accelerator.device)
            meta_group_ids = batch_group_ids(meta_batch, config, accelerator.device)
        outcome = optimization_step(model, network, objective, optimizer, scheduler, accelerator, config, inputs,
                                    seed=step_seed, weighting=weighting, meta_inputs=meta_inputs,
                                    group_ids=group_ids, meta_group_ids=meta_group_ids)
        result, meta_result = outcome.output, outcome.meta
        if meta_result is not None and meta_result.skipped:
            meta_skipped += 1
            logger.warning("non-finite value in the meta iteration at step %d: WeightNet not updated", step)
        if outcome.skipped:
            nonfinite_in_row += 1
            nonfinite_total += 1
            logger.warning("non-finite loss at step %d: step skipped (%d in a row)", step, nonfinite_in_row)
            if nonfinite_in_row >= config.train.max_nonfinite_steps:
                raise NonFiniteLossError(
                    f"{nonfinite_in_row} non-finite losses in a row at step {step}; stopping. The last good "
                    f"checkpoint is {list_checkpoints(output_dir)[-1] if list_checkpoints(output_dir) else 'none'}")
            continue
        nonfinite_in_row = 0
        step += 1
        samples_seen += config.train.batch_size
        progress.update(1)

        if weighting is not None:
            log.max_loss_seen = max(log.max_loss_seen, result.per_sample.detach().float().max().item())
            if step % config.meta.weights_log_every == 0 or step == config.train.max_steps:
                log.sample_weights(step, batch["key"], result.per_sample.detach(), result.weights)
        if step % config.train.log_every == 0 or step == config.train.max_steps:
            rate = samples_seen / max(time.time() - started, 1e-9)
            record = {"step": step, "epoch": data_epoch, "lr": scheduler.get_last_lr()[0],
                      "logit_scale": network.log_logit_scale.exp().item(), "samples_per_s": rate,
                      **{f"loss/{name}": value.item() for name, value in result.terms.items()}}
            if meta_result is not None:
                record.update({"meta/virtual_loss": meta_result.virtual_loss,
                               "meta/meta_loss": meta_result.meta_loss,
                               "meta/weight_mean": meta_result.weight_mean})
            log.metrics(record)
            progress.set_postfix(loss=f"{result.terms['total'].item():.3f}", samples_s=f"{rate:.1f}")
        if config.data.val is not None and config.train.val_every and step % config.train.val_every == 0:
            log.metrics({"step": step, **validate(network, config, accelerator, val_cache)})
        if step % config.train.checkpoint_every == 0 or step == config.train.max_steps:
            save_checkpoint(accelerator, output_dir, step,
                            {"data_epoch": data_epoch, **_counters(nonfinite_total, meta_skipped, skipped),
                             "max_loss_seen": log.max_loss_seen}, checkpointed,
                            data_position={name: stream.state_dict() for name, stream in data_streams.items()},
                            keep=config.train.keep_checkpoints)
    progress.close()

    summary = {"steps": step, "world_size": world_size, "resumed_from_step": resumed_from_step,
               "data_epoch": data_epoch, **_counters(nonfinite_total, meta_skipped, skipped),
               "wall_time_s": time.time() - started}
    if config.data.val is not None:
        summary["validation"] = validate(network, config, accelerator, val_cache)
        log.metrics({"step": step, **summary["validation"]})
    if accelerator.is_main_process:
        save_run(network, config, output_dir)
        if weighting is not None:
            weighting.plot_curve(output_dir / "weighting_curve.png", log.max_loss_seen)
        (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        logger.info("run summary: %s", summary)  # the log file's copy; the CLI prints the summary itself
    accelerator.wait_for_everyone()
    if owns_process_group:
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
    if modality == "image":
        return {**inputs, "images": torch.zeros(1, 3, size, size, device=device)}
    return {**inputs, "frames": torch.zeros(1, frames, 3, size, size, device=device),
            "frame_mask": torch.ones(1, frames, dtype=torch.bool, device=device)}


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


def _epochs(stream) -> Iterator[tuple[int, dict]]:
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


def model_inputs(batch: dict[str, Any], device: torch.device) -> dict[str, torch.Tensor]:
    """The keyword arguments of the dual encoder for one batch (an image is a one-frame video; a cached batch: trunk features)."""
    if "text_trunk" in batch:
        inputs = {"text_trunk": batch["text_trunk"].to(device, non_blocking=True)}
        if batch["modality"] == "image":
            return {**inputs, "image_trunk": batch["image_trunk"].to(device, non_blocking=True)}
        return {**inputs, "frame_trunk": batch["frame_trunk"].to(device, non_blocking=True),
                "frame_mask": batch["frame_mask"].to(device, non_blocking=True)}
    text = batch["text"].to(device, non_blocking=True)
    if batch["modality"] == "image":
        return {"text": text, "images": batch["frames"][:, 0].to(device, non_blocking=True)}
    return {"text": text, "frames": batch["frames"].to(device, non_blocking=True),
            "frame_mask": batch["frame_mask"].to(device, non_blocking=True)}


def batch_group_ids(batch: dict[str, Any], config: Config, device: torch.device) -> torch.Tensor | None:
    """Integer group ids [n] of a batch for ``loss.positives: group`` (None otherwise).

    A sample's group is the ``group`` of its JSON, else its media key (the pipeline fills
    ``batch["group"]``); names become 63-bit integers by a stable hash, equal on every rank.
    """
    if config.loss.positives != "group":
        return None
    if "group" not in batch or all(group == key for group, key in zip(batch["group"], batch["key"])):
        # no sample of the batch names a group: the source has none, and every sample would be its own
        raise MmsphereError(f"loss.positives=group, but the samples of data source {batch.get('source')!r} carry no "
                            f"group ids (a 'group' field in their .json; make-shards writes one from a 'group' "
                            f"column): every sample would be a group of its own")
    ids = [int.from_bytes(hashlib.blake2b(str(group).encode(), digest_size=8).digest(), "little") >> 1
           for group in batch["group"]]
    return torch.tensor(ids, dtype=torch.long, device=device)


def _skipped_everywhere(counts: dict[str, int]) -> dict[str, int]:
    total: dict[str, int] = {}
    for per_rank in gather_object([counts]) if dist.is_available() and dist.is_initialized() else [counts]:
        for reason, count in per_rank.items():
            total[reason] = total.get(reason, 0) + count
    return total


def _counters(nonfinite_total: int, meta_skipped: int, skipped: stats.SkipTally) -> dict[str, Any]:
    """The run's counters, as summary.json reports them and each checkpoint keeps them (every process calls this)."""
    return {"nonfinite_steps_skipped": nonfinite_total, "meta_iterations_skipped": meta_skipped,
            "skipped_samples": _skipped_everywhere(skipped.counts())}


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
