"""Cancel a run, as the service's "View, manage and analyze runs" page does."""

import os

from kubetune import foundation_model as fm  # was: from databricks.model_training import foundation_model as fm

run = fm.get(os.environ.get("RUN_NAME", "<run-name>"))
fm.cancel(run)
print(run.refresh().status)
