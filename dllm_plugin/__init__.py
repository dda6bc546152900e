"""dllm-trainer: supervised fine-tuning of text diffusion language models.

Importing the package registers the native LLaDA and Dream classes with the
transformers Auto classes, so official checkpoints load without remote code.
"""

from . import models  # noqa: F401  (registration side effect)

__version__ = "0.1.0"
