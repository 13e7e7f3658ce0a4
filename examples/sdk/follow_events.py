"""Follow a run's events until it ends, as the service's "View, manage and analyze runs" page does.

Prints each event as it happens and the progress while it trains (in a notebook: one live cell).
"""

import os
import sys

from kubetune import foundation_model as fm  # was: from databricks.model_training import foundation_model as fm

run = fm.get(os.environ.get("RUN_NAME", "<run-name>"))
events = fm.get_events(run, follow=True)
for event in events:
    print(event.type, event.time, event.message)

run = run.refresh()
print("last event:", run.get_events()[-1])
print(f"{run.name} ended {run.status}; registered to {run.register_to}")
sys.exit(0 if run.status == fm.RunStatus.COMPLETED else 1)
