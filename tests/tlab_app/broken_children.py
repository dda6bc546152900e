"""A task process whose launched training processes cannot import transformers: after
this process has imported the real one, a folder with a transformers that fails to
import (think of an older one) goes first on sys.path, which the children inherit.
Each child dies at start-up, before it can write its failure reason; the job's reason
must be the child's own exception line. Run as task.yaml's `run` would be, from the
job's home; the folder is in BROKEN_PACKAGES."""

import os
import runpy
import sys

import transformers  # noqa: F401  (the real one, as the task's own process has it)

sys.path.insert(0, os.environ["BROKEN_PACKAGES"])
runpy.run_path("main.py", run_name="__main__")
