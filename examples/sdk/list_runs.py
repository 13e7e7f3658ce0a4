"""List runs by status, as the service's "View, manage and analyze runs" page does."""

from kubetune import foundation_model as fm  # was: from databricks.model_training import foundation_model as fm

completed = fm.list(statuses=["COMPLETED"], limit=10)
for run in completed:
    print(run.name, run.status, run.model, run.created_at, run.completed_at)

active = fm.list(statuses=["PENDING", "QUEUED", "STARTING", "RUNNING"])
print(f"{len(active)} run(s) in progress")
