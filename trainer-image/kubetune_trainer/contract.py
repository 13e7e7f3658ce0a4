"""The plane contract: every name the operator and the trainer must spell alike.

Exit codes, the keys of a step's result document, the progress report (Prometheus gauges and
`result/progress.json`) and the environment variables the operator sets on trainer pods. Both
planes import these constants instead of writing the strings twice (docs/contracts.md explains
each). Pure Python, no imports beyond the standard library: the operator imports it.
"""

from __future__ import annotations

# --- exit codes of `python -m kubetune_trainer <step>` -----------------------------------------
EXIT_OK = 0
EXIT_RETRYABLE = 1  # anything else: the operator restarts the step, up to backoffLimit
EXIT_PERMANENT = 2  # a user error (errors.UserError): the run fails, no retry

# --- the step result document (the pod's termination message, <= 4 KiB) ----------------------
TERMINATION_LOG = "/dev/termination-log"
MAX_RESULT_BYTES = 4096  # the kubelet's limit on a termination message

RESULT_STEP = "step"
RESULT_OK = "ok"
# on failure
RESULT_REASON = "reason"  # CamelCase, becomes the Failed condition's reason
RESULT_MESSAGE = "message"
RESULT_PERMANENT = "permanent"
# on success, by step
RESULT_DATA_STATS = "dataStats"  # prepare: {samples, tokens, truncatedSamples, sequences, packingEfficiency}
RESULT_LATEST_CHECKPOINT = "latestCheckpoint"  # train
RESULT_MLFLOW = "mlflow"  # train, register: {experimentId, runId}
RESULT_HF_FOLDER = "hfFolder"  # convert
RESULT_REGISTERED_MODEL = "registeredModel"  # register: {name, version, artifactUri}
# train: the checkpoint (its URI) this attempt resumed from; absent when it started from the weights.
RESULT_RESUMED_FROM = "resumedFrom"
# train: set when the run resumed from an older checkpoint than the newest one (that one was
# unreadable or half-written), or started from the weights for want of a readable one; a line
# for a person. The operator records either as an event, once per attempt.
RESULT_RESUME_NOTE = "resumeNote"

MLFLOW_EXPERIMENT_ID = "experimentId"
MLFLOW_RUN_ID = "runId"

# --- the prepare Job's pods (dataPrep.parallelism > 1: an Indexed Job, one shard per pod) ----
ENV_PREP_SHARD = "KUBETUNE_PREP_SHARD"  # this pod's number, 0..N-1 (its completion index)
ENV_PREP_SHARDS = "KUBETUNE_PREP_SHARDS"  # N

# --- files under work_dir --------------------------------------------------------------------
PROGRESS_FILE = "result/progress.json"
TRAIN_RESULT_FILE = "result/train.json"
# A step's folder is complete once its marker is there: each step writes it last.
DATA_MARKER = "_SUCCESS"             # in data/, by prepare: the data stats
HF_MARKER = ".kubetune-source.json"  # in hf/, by convert: its source checkpoint (hidden: from_pretrained ignores it)

# --- the progress report of rank 0 (`progress.json` keys and the gauges that carry them) -------
PROGRESS_PERCENT = "percent"
PROGRESS_BATCHES_DONE = "batchesDone"
PROGRESS_BATCHES_TOTAL = "batchesTotal"
PROGRESS_TOKENS_PER_SECOND = "tokensPerSecond"
PROGRESS_LOSS = "loss"
PROGRESS_ETA_SECONDS = "etaSeconds"
PROGRESS_MFU = "mfu"  # model FLOPs utilisation 0..1; null when the accelerator's peak is unknown
PROGRESS_LATEST_CHECKPOINT = RESULT_LATEST_CHECKPOINT
PROGRESS_MLFLOW = RESULT_MLFLOW
PROGRESS_RESUMED_FROM = RESULT_RESUMED_FROM
PROGRESS_RESUME_NOTE = RESULT_RESUME_NOTE
PROGRESS_TIME = "time"  # unix time of the report
PROGRESS_KEYS = (PROGRESS_PERCENT, PROGRESS_BATCHES_DONE, PROGRESS_BATCHES_TOTAL,
                 PROGRESS_TOKENS_PER_SECOND, PROGRESS_LOSS, PROGRESS_ETA_SECONDS, PROGRESS_MFU,
                 PROGRESS_LATEST_CHECKPOINT, PROGRESS_MLFLOW, PROGRESS_RESUMED_FROM, PROGRESS_RESUME_NOTE,
                 PROGRESS_TIME)

METRIC_PREFIX = "kubetune_train_"
METRIC_PROGRESS_RATIO = "kubetune_train_progress_ratio"  # percent / 100
# gauge -> the progress.json key it carries (the ratio is the one gauge scaled differently)
METRIC_GAUGES = {
    "kubetune_train_batches_done": PROGRESS_BATCHES_DONE,
    "kubetune_train_batches_total": PROGRESS_BATCHES_TOTAL,
    "kubetune_train_tokens_per_second": PROGRESS_TOKENS_PER_SECOND,
    "kubetune_train_loss": PROGRESS_LOSS,
    "kubetune_train_eta_seconds": PROGRESS_ETA_SECONDS,
    "kubetune_train_mfu": PROGRESS_MFU,
}
METRIC_INFO = "kubetune_train_info"  # value 1; the labels below carry the strings
INFO_MLFLOW_RUN_ID = "mlflow_run_id"
INFO_MLFLOW_EXPERIMENT_ID = "mlflow_experiment_id"
INFO_LATEST_CHECKPOINT = "latest_checkpoint"
INFO_RESUMED_FROM = "resumed_from"
INFO_RESUME_NOTE = "resume_note"
INFO_LABELS = (INFO_MLFLOW_RUN_ID, INFO_MLFLOW_EXPERIMENT_ID, INFO_LATEST_CHECKPOINT, INFO_RESUMED_FROM,
               INFO_RESUME_NOTE)

# --- environment variables --------------------------------------------------------------------
# Set by the operator (or local mode) on trainer pods and read by the trainer.
ENV_TERMINATION_LOG = "KUBETUNE_TERMINATION_LOG"  # where the result goes instead of TERMINATION_LOG
ENV_SCRATCH_DIR = "KUBETUNE_SCRATCH_DIR"  # staging copies of an object-store work_dir
# "1" on clusters whose GPUs are a stand-in resource (no CUDA device behind it): train on CPU
# instead of failing NoCUDADevice. The operator sets it from KUBETUNE_CPU_FALLBACK.
ENV_CPU_FALLBACK = "KUBETUNE_CPU_FALLBACK"
ENV_POD_IP = "POD_IP"  # rank 0 binds its metrics endpoint here
ENV_HF_TOKEN = "HF_TOKEN"
ENV_HF_HOME = "HF_HOME"
ENV_MLFLOW_TRACKING_URI = "MLFLOW_TRACKING_URI"
# torchrun's rendezvous, from the pod env (docs/contracts.md, "Distributed environment")
ENV_NNODES = "NNODES"
ENV_NPROC_PER_NODE = "NPROC_PER_NODE"
ENV_NODE_RANK = "NODE_RANK"
ENV_MASTER_ADDR = "MASTER_ADDR"
ENV_MASTER_PORT = "MASTER_PORT"
ENV_RANK = "RANK"  # set by torchrun per process; absent for a single process (rank 0)
