"""Checks of the deployment files: Dockerfiles, worker launcher, Compose, Kubernetes.

No Docker engine or cluster is needed: files are linted (hadolint), schema-validated
(compose-spec via check-jsonschema, Kubernetes via kubernetes-validate) and their
invariants are checked with PyYAML.
"""
