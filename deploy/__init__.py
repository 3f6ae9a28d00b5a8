"""Deployment: generated Triton model repositories and Kubernetes manifests."""
