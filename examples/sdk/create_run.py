"""Create a training run, as the service's "Create a training run using the API" page does.

Only the import line differs from the service's tutorial. The values are the tutorial's unless
the environment names others (the e2e test points them at a tiny model and data).
"""

import os

from kubetune import foundation_model as fm  # was: from databricks.model_training import foundation_model as fm

model = os.environ.get("MODEL", "meta-llama/Llama-3.2-3B-Instruct")
train_data_path = os.environ.get("TRAIN_DATA_PATH", "dbfs:/Volumes/main/mydirectory/ift/train.jsonl")
register_to = os.environ.get("REGISTER_TO", "main.mydirectory")

run = fm.create(
    model=model,
    train_data_path=train_data_path,  # JSONL file of {"prompt": ..., "response": ...} lines
    register_to=register_to,  # catalog and schema to register the model to
    training_duration=os.environ.get("TRAINING_DURATION", "1ep"),
    learning_rate=float(os.environ.get("LEARNING_RATE", "5e-7")),
    context_length=int(os.environ["CONTEXT_LENGTH"]) if "CONTEXT_LENGTH" in os.environ else None,
)
print(run)
print(run.name)
