"""lm-evaluation-harness's own command line, with our `dllm` model type registered.

    python -m dllm_plugin.evaluation.lm_eval_cli --model dllm \\
        --model_args pretrained=PATH[,adaptor=PATH][,mc_samples=32,seed=1234] \\
        --tasks TASKS [--include_path DIR] [--apply_chat_template] [any lm-eval argument]

lm-eval 0.4 finds model types only inside its own package, so its `lm_eval` command
cannot see ours; this module registers it (by importing lm_eval_model, which must stay a
separate module: run as __main__ it would register a second class under the same name)
and hands the arguments to lm-eval unchanged.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError as e:
        sys.exit(f"error: lm-eval is not installed ({e}); pip install 'dllm-trainer[eval]'")
    from . import lm_eval_model  # noqa: F401  registers --model dllm

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
