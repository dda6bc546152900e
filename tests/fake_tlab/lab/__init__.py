"""Fake `lab` (the job store of the `transformerlab` PyPI package)."""

from . import dirs
from .job import Job

__all__ = ["Job", "dirs"]
