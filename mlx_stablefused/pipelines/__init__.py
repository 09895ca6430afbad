"""Pipelines, written once for every backend."""
