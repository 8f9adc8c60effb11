"""The thin Kubeflow Pipelines components around the stages, and engine-task placement."""
