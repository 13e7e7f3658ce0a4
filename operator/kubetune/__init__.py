"""kubetune: a Kubernetes operator that fine-tunes LLMs from TrainingRun resources."""
