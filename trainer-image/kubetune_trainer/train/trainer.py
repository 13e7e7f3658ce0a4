"""Assembles and runs the Composer Trainer for one `train` step (SPEC §3 steps 3-4).

Every rank runs this; side effects outside Composer (progress, result files, MLflow checkpoint
records) happen on rank 0 only. Restarted ranks resume from the latest checkpoint.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from composer import Evaluator, Trainer
from composer.callbacks import CheckpointSaver
from composer.core import Callback
from composer.utils import dist

from .. import checkpoints
from ..checkpoints import ResumePoint
from ..config import RunConfig
from ..contract import (ENV_POD_IP, MLFLOW_EXPERIMENT_ID, MLFLOW_RUN_ID, RESULT_LATEST_CHECKPOINT, RESULT_MLFLOW,
                        RESULT_RESUME_NOTE, RESULT_RESUMED_FROM, TRAIN_RESULT_FILE)
from ..errors import UserError, storage_full
from ..inputs import check_confined
from ..results import write_json_atomically
from ..storage import Mirror
from ..tracking import tracking_uri
from .callbacks import CheckpointGenerations, CheckpointUploader, CheckpointWatcher, WeightsDigest
from .dataset import data_spec, open_prepared
from .flops import flops_per_token, peak_flops
from .lion import DecoupledLionW
from .mlflow_logging import RunRecord, composer_run_name, hyperparameters, mark_failed, mlflow_logger
from .model import composer_model, load_custom_weights
from .progress import Progress
from .runtime import (Runtime, cpu_fallback_allowed, cuda_available, flash_attention_installed,
                      runtime_for)
from .schedule import WarmupLinearDecay

BETAS = (0.99, 0.95)
EVAL_METRICS = ["LanguageCrossEntropy", "LanguagePerplexity"]


@dataclass
class Assembly:
    trainer: Trainer
    runtime: Runtime
    resume: ResumePoint
    record: RunRecord | None  # rank 0 only: the MLflow ids, known once the Trainer exists

    @property
    def mlflow_ids(self) -> dict[str, str | None]:
        return dict(self.record.ids) if self.record else {MLFLOW_EXPERIMENT_ID: None, MLFLOW_RUN_ID: None}


def device_batch_size(global_batch_size: int, world_size: int) -> int:
    if global_batch_size % world_size:
        raise UserError(f"globalBatchSize {global_batch_size} is not a multiple of the {world_size} "
                        "training processes", "InvalidBatchSize")
    return global_batch_size // world_size


def metrics_port(config: RunConfig) -> int | None:
    return config.metrics_port or None  # 0 turns the HTTP endpoint off (progress.json stays)


def initial_weights(config: RunConfig, model, runtime: Runtime) -> str | None:
    """Load customWeightsPath (a run without a checkpoint of its own to resume from).
    Returns a load path for Composer when FSDP must load it shard-wise itself."""
    if not config.custom_weights_path:
        return None
    check_confined(config, ("customWeightsPath",))  # prepare checked it too; the files may have changed since
    if runtime.fsdp:
        return config.custom_weights_path
    load_custom_weights(model, config.custom_weights_path, config.model)
    return None


def metrics_host() -> str:
    return os.environ.get(ENV_POD_IP) or "0.0.0.0"


def checkpoint_callbacks(config: RunConfig, resume: ResumePoint, progress: Progress | None,
                         record: RunRecord | None) -> list[Callback]:
    """The saver, then a watcher telling rank 0's listeners (progress, MLflow) of each new one."""
    saver = CheckpointSaver(folder=config.checkpoint_dir, filename=checkpoints.FILENAME,
                            latest_filename=checkpoints.LATEST_FILENAME, save_interval=config.save_interval,
                            overwrite=True)
    callbacks: list[Callback] = [saver]
    if config.remote_work_dir:  # on an object store: uploaded before anyone is told
        callbacks.append(CheckpointUploader(saver, Mirror(config.remote_work_dir, Path(config.work_dir))))
    if progress is not None and record is not None:
        listeners = [lambda path: progress.set_checkpoint(config.published(path)), record]
        callbacks += [record, CheckpointWatcher(saver, listeners, resume.checkpoint), progress]
    if config.eval_prompts:
        callbacks.append(CheckpointGenerations(config.eval_prompts, config.save_interval))
    return callbacks


def dataloaders(config: RunConfig, runtime: Runtime, batch: int) -> tuple[Any, Evaluator | None, int]:
    """Train DataSpec, eval Evaluator (if eval data) and the context length of the prepared data."""
    train_split = open_prepared(config.data_dir, "train")
    eval_split = open_prepared(config.data_dir, "eval") if config.eval_data_path else None
    spec = dict(block_mask=runtime.block_mask, seed=config.seed)
    train = data_spec(train_split, batch, shuffle=True, **spec)
    evaluator = None
    if eval_split is not None:
        evaluator = Evaluator(label="eval", dataloader=data_spec(eval_split, batch, shuffle=False, **spec),
                              metric_names=EVAL_METRICS)
    return train, evaluator, train_split.context_length


def build(config: RunConfig, extra_callbacks: Sequence[Callback] = ()) -> Assembly:
    world_size, rank_zero = dist.get_world_size(), dist.get_global_rank() == 0
    batch = device_batch_size(config.global_batch_size, world_size)
    runtime = runtime_for(config.distributed, batch, flash_attention_installed(),
                          cuda=cuda_available(), cpu_fallback=cpu_fallback_allowed())
    train, evaluator, context_length = dataloaders(config, runtime, batch)

    model = composer_model(config.model, runtime, empty=runtime.fsdp and not rank_zero)
    # Resume from this run's own newest whole checkpoint on the shared storage, else start from
    # the custom weights. Not Composer's `autoresume`: its per-node signal files collide when the
    # nodes share one checkpoint folder (a ReadWriteMany PVC), failing every multi-node start.
    resume = checkpoints.resume_point(config.checkpoint_dir)
    load_path = str(resume.checkpoint) if resume.checkpoint else initial_weights(config, model, runtime)
    progress = record = None
    if rank_zero:
        progress = Progress(config.progress_file, metrics_port(config), metrics_host(),
                            flops_per_token=flops_per_token(model.model, context_length),
                            peak_flops=accelerator_peak(runtime, world_size))
        progress.set_resume(resumed_from(config, resume), resume.note)
        record = RunRecord(config, hyperparameters(config, context_length, world_size), progress)
    callbacks = checkpoint_callbacks(config, resume, progress, record)
    checkpoints.align_storages()  # page-aligned tensors: converted page for page
    if not runtime.fsdp:  # sharded ranks hold different shards: nothing to compare
        callbacks.append(WeightsDigest(Path(config.result_dir)))
    trainer = Trainer(
        model=model,
        train_dataloader=train,
        eval_dataloader=evaluator,
        eval_interval=config.save_interval if evaluator is not None else 1,  # 1: Composer's "unset"
        max_duration=config.training_duration,
        optimizers=DecoupledLionW(model.parameters(), lr=config.learning_rate, betas=BETAS, weight_decay=0.0),
        schedulers=WarmupLinearDecay(),
        step_schedulers_every_batch=True,
        callbacks=[*callbacks, *extra_callbacks],
        loggers=[mlflow_logger(config, system_metrics=runtime.device == "gpu")],
        run_name=composer_run_name(config),
        save_folder=config.checkpoint_dir,
        save_filename=checkpoints.FILENAME,
        save_latest_filename=checkpoints.LATEST_FILENAME,
        save_overwrite=True,  # a checkpoint written after the one `latest` names may be redone
        autoresume=False,
        load_path=load_path,
        load_weights_only=resume.checkpoint is None and load_path is not None,
        seed=config.seed,
        device=runtime.device,
        precision=runtime.precision,
        device_train_microbatch_size=runtime.microbatch_size,
        parallelism_config=runtime.parallelism,
        progress_bar=False,
        log_to_console=True,
        console_log_interval="10ba",
    )
    return Assembly(trainer, runtime, resume, record)


def resumed_from(config: RunConfig, resume: ResumePoint) -> str | None:
    """The checkpoint resumed from as readers outside this pod name it (the object store's URI)."""
    return config.published(str(resume.checkpoint)) if resume.checkpoint else None


def accelerator_peak(runtime: Runtime, world_size: int) -> float | None:
    """The dense bf16 peak of all the run's GPUs together (the same kind on every node)."""
    if runtime.device != "gpu":
        return None
    import torch

    peak = peak_flops(torch.cuda.get_device_name())
    return peak * world_size if peak else None


def finished(trainer: Trainer) -> bool:
    elapsed = trainer.state.get_elapsed_duration()  # after autoresume loaded the latest checkpoint
    return elapsed is not None and float(elapsed.value) >= 1.0


def run_train(config: RunConfig, *, callbacks: Sequence[Callback] = ()) -> dict[str, Any]:
    """The `train` step: returns (and on rank 0 writes to result/train.json) the result fields."""
    assembly = build(config, callbacks)
    try:
        if not finished(assembly.trainer):  # a retry after the last batch only reports again
            assembly.trainer.fit()
    except BaseException as error:
        assembly.trainer.close()
        if assembly.mlflow_ids[MLFLOW_RUN_ID]:
            mark_failed(assembly.mlflow_ids[MLFLOW_RUN_ID], tracking_uri(config))
        staging = config.remote_work_dir and f"the local staging copy of {config.remote_work_dir}"
        full = storage_full(error, config.work_dir, staging or None)
        if full is not None:
            raise full from error
        raise
    assembly.trainer.close()
    latest = checkpoints.latest(config.checkpoint_dir)
    result: dict[str, Any] = {RESULT_LATEST_CHECKPOINT: latest and config.published(str(latest)),
                              RESULT_MLFLOW: assembly.mlflow_ids}
    if assembly.resume.checkpoint:
        result[RESULT_RESUMED_FROM] = resumed_from(config, assembly.resume)
    if assembly.resume.note:
        result[RESULT_RESUME_NOTE] = assembly.resume.note
    if dist.get_global_rank() == 0:
        write_json_atomically(Path(config.path(TRAIN_RESULT_FILE)), result)
    return result
