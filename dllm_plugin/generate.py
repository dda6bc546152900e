"""Generate from a trained diffusion model on the command line.

    python -m dllm_plugin.generate --model PATH [--adaptor PATH] --prompt TEXT \
        [--steps N --max-new-tokens N --block-size N --temperature T]

Loads a base model (optionally with a LoRA adaptor) or a full fine-tune, formats the
prompt with the family's chat template and prints the answer.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

from .methods import Method, resolve_method
from .models.families import (
    TokenIds,
    detect_family,
    load_tokenizer,
    prepare_tokenizer,
    read_model_config,
)
from .models.loading import resolve_model_path
from .preview import answer
from .sampling import DREAM_ALGORITHMS, MDLM_ALGORITHMS, SamplingConfig


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m dllm_plugin.generate", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--model", required=True, help="base model or full fine-tune (folder or hub id)"
    )
    parser.add_argument("--adaptor", help="LoRA adaptor folder to apply to --model")
    parser.add_argument("--prompt", required=True, help="the user message")
    parser.add_argument("--system", default="", help="optional system message")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument(
        "--steps", type=int, default=None, help="denoising steps (default: max-new-tokens)"
    )
    parser.add_argument(
        "--block-size", type=int, default=32, help="MDLM block length (bert, llada)"
    )
    parser.add_argument(
        "--temperature", type=float, default=0.0, help="0 = greedy and deterministic"
    )
    parser.add_argument(
        "--algorithm",
        default=None,
        help=f"MDLM: {', '.join(MDLM_ALGORITHMS)}; Dream: {', '.join(DREAM_ALGORITHMS)}",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser.parse_args(argv)


def load_for_generation(
    model_name: str, adaptor: str | None, device: str, training_method: str = "auto"
) -> tuple[Any, Any, TokenIds, Method]:
    """(model, tokenizer, special ids, the method) ready to sample; `auto`: the family's."""
    from transformers import AutoModelForMaskedLM

    from . import models  # noqa: F401  (native LLaDA/Dream classes)

    model_path = resolve_model_path(model_name)
    model_config = read_model_config(model_path)
    family = detect_family(model_config)
    tokenizer_source = (
        adaptor if adaptor and (Path(adaptor) / "tokenizer_config.json").is_file() else model_path
    )
    tokenizer = load_tokenizer(tokenizer_source, family)
    ids = prepare_tokenizer(tokenizer, family, model_config)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    model = AutoModelForMaskedLM.from_pretrained(model_path, dtype=dtype)
    if adaptor:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adaptor)
    return (
        model.to(device).eval(),
        tokenizer,
        ids,
        resolve_method(training_method, family, model_name),
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        model, tokenizer, ids, method = load_for_generation(args.model, args.adaptor, args.device)
        algorithm = args.algorithm or "low_confidence"  # Dream reads it as maskgit_plus
        config = SamplingConfig(
            max_new_tokens=args.max_new_tokens,
            steps=args.steps or args.max_new_tokens,
            block_size=min(args.block_size, args.max_new_tokens),
            temperature=args.temperature,
            algorithm=algorithm,
            seed=args.seed,
        )
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": args.prompt}
        ]
        print(answer(model, tokenizer, ids, method, messages, config))
    except Exception as e:  # one clear line, non-zero exit
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
