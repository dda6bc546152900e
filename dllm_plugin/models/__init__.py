"""Native LLaDA and Dream models, registered with the transformers Auto classes.

Importing this package is enough: ``AutoConfig``/``AutoModel``/``AutoModelForMaskedLM``
(and, for LLaDA, ``AutoModelForCausalLM``) then load the official checkpoints by their
``model_type`` ("llada", "Dream") with no ``trust_remote_code``; saved a2d conversions
(``a2d-qwen2``, ... in a2d.py) load through ``AutoModelForMaskedLM`` the same way. Because the registered
classes live outside the ``transformers`` package, transformers treats them as explicit
local code and prefers them over the checkpoints' ``auto_map`` even when
``trust_remote_code=True``. Registration uses ``exist_ok=True`` so importing or reloading
this module twice is harmless.
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    PretrainedConfig,
    PreTrainedModel,
)

from .a2d import register_a2d_models
from .dream import DreamConfig, DreamModel
from .llada import LLaDAConfig, LLaDAModelLM

__all__ = ["DreamConfig", "DreamModel", "LLaDAConfig", "LLaDAModelLM", "register_native_models"]


def _register(
    config_cls: type[PretrainedConfig], model_cls: type[PreTrainedModel], *autos: type
) -> None:
    AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
    for auto in autos:
        auto.register(config_cls, model_cls, exist_ok=True)


def register_native_models() -> None:
    """(Re-)register both families; idempotent, called once on import."""
    _register(LLaDAConfig, LLaDAModelLM, AutoModel, AutoModelForMaskedLM, AutoModelForCausalLM)
    _register(DreamConfig, DreamModel, AutoModel, AutoModelForMaskedLM)
    register_a2d_models()


register_native_models()
