"""Continue training from the last checkpoint of an earlier run with `custom_weights_path`,
as the service's "Configure a training run" page describes it."""

import os

from kubetune import foundation_model as fm  # was: from databricks.model_training import foundation_model as fm

previous = fm.get(os.environ.get("RUN_NAME", "<run-name>"))
checkpoints = fm.get_checkpoints(previous)
print("checkpoints:", checkpoints)

run = fm.create(
    model=previous.model,
    train_data_path=os.environ.get("TRAIN_DATA_PATH", previous.train_data_path),
    register_to=previous.register_to,
    custom_weights_path=checkpoints[-1],  # a Composer checkpoint: the last one of the earlier run
    training_duration=os.environ.get("TRAINING_DURATION", "1ep"),
    learning_rate=previous.learning_rate,
    context_length=previous.context_length,
)
print(run.custom_weights_path)
print(run.name)
