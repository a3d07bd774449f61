"""Cloud control plane: fleet, enrollment, deployments, model publishing, training."""
