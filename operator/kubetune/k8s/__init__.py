"""The Kubernetes shell: kopf handlers that observe a run's children, call `decide`, apply."""
