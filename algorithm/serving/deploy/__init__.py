"""Production deployment files: ``plan.py`` (ManifestConfig and the Plan the configs resolve
to), ``k8s.py`` (the Kubernetes objects), ``manifests.py`` (the Dockerfile and writing it all)."""
