"""The control plane: what the cloud tells the fleet (publishing signed model manifests)."""
