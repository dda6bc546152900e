"""Generate from a trained diffusion model on the command line.

    python -m dllm_plugin.generate --model PATH [--adaptor PATH] --prompt TEXT \
        [--steps N --max-new-tokens N --block-size N --temperature T]

Loads a base model (optionally with a LoRA adaptor) or a full fine-tune, formats the
prompt with the family's chat template and prints the answer, sampled the way the model
was trained (the saved diffusion_recipe.json: block diffusion samples block by block with
its trained block size).
"""

from __future__ import annotations

import argparse
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import UserError
from .methods import AUTO, Method, read_recipe, resolve_method, saved_method
from .models.families import (
    TokenIds,
    detect_family,
    load_tokenizer,
    position_limit,
    prepare_tokenizer,
    read_model_config,
)
from .models.loading import resolve_model_path
from .preview import answer_ids, prompt_token_ids
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
        "--steps",
        type=int,
        default=None,
        help="denoising steps (default: max-new-tokens; DiffusionGemma: at most this many per canvas)",
    )
    parser.add_argument(
        "--block-size",
        type=int,
        default=None,
        help="MDLM block length (default 32); block diffusion uses its trained size, "
        "DiffusionGemma its canvas_length",
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


@dataclass
class GenerationSetup:
    """Everything but the weights: read and checked before the model is loaded."""

    model_path: str
    family: str
    method: Method
    tokenizer: Any
    ids: TokenIds
    limit: int | None  # the model's position limit
    trained_block_size: int | None = None  # block diffusion: the block size it was trained with


def prepare_generation(
    model_name: str, adaptor: str | None, training_method: str = "auto"
) -> GenerationSetup:
    """Config, family, tokenizer, special ids and the method (`auto`: the family's); no weights."""
    model_path = resolve_model_path(model_name)
    model_config = read_model_config(model_path)
    family = detect_family(model_config)
    if adaptor and not (Path(adaptor) / "adapter_config.json").is_file():
        raise UserError(
            f"--adaptor: {adaptor!r} is not a LoRA adaptor folder (no adapter_config.json)"
        )
    tokenizer_source = (
        adaptor if adaptor and (Path(adaptor) / "tokenizer_config.json").is_file() else model_path
    )
    tokenizer = load_tokenizer(tokenizer_source, family)
    ids = prepare_tokenizer(tokenizer, family, model_config)
    limit = position_limit(model_config, family)
    trained = read_recipe(adaptor) if adaptor else None
    if trained is None and Path(model_path).is_dir():
        trained = read_recipe(model_path)
    if training_method == AUTO:  # as it was trained (its recipe), else the family's
        method = saved_method(trained, family)
    else:
        method = resolve_method(training_method, family, model_name)
    block_size = trained.get("block_size") if trained else None
    return GenerationSetup(model_path, family, method, tokenizer, ids, limit, block_size)


def check_arguments(args: argparse.Namespace) -> None:
    """Every argument that needs no file, each error naming its flag."""
    for flag, value in (
        ("--max-new-tokens", args.max_new_tokens),
        ("--block-size", args.block_size),
        ("--steps", args.steps),
    ):
        if value is not None and value < 1:
            raise UserError(f"{flag}: must be >= 1, got {value}")
    if args.temperature < 0:
        raise UserError(f"--temperature: must be >= 0, got {args.temperature}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(
            f"--device: {args.device!r} is not available here (no CUDA device); use cpu"
        )


def check_against_model(args: argparse.Namespace, setup: GenerationSetup) -> list[int]:
    """The algorithm for this family and the prompt's length; returns the prompt's ids."""
    allowed = setup.method.sampler_function().algorithms
    if args.algorithm is not None and args.algorithm not in allowed:
        raise UserError(
            f"--algorithm: {args.algorithm!r} is not one of {', '.join(allowed)} "
            f"({setup.family} models)"
        )
    if setup.trained_block_size and args.block_size not in (None, setup.trained_block_size):
        raise UserError(
            f"--block-size: this model was trained with block diffusion in blocks of "
            f"{setup.trained_block_size}; it must be sampled with the same size"
        )
    prompt_ids = prompt_token_ids(setup.tokenizer, messages(args))
    needed = len(prompt_ids) + args.max_new_tokens
    if setup.trained_block_size:  # block diffusion writes whole blocks
        needed = -(-needed // setup.trained_block_size) * setup.trained_block_size
    if setup.limit is not None and needed > setup.limit:
        raise UserError(
            f"--prompt: {len(prompt_ids)} prompt tokens + --max-new-tokens {args.max_new_tokens} "
            f"= {needed} is more than the model's limit of {setup.limit} positions"
        )
    return prompt_ids


def messages(args: argparse.Namespace) -> list[dict[str, str]]:
    system = [{"role": "system", "content": args.system}] if args.system else []
    return [*system, {"role": "user", "content": args.prompt}]


def load_weights(setup: GenerationSetup, adaptor: str | None, device: str) -> Any:
    """The model (with the adaptor applied), in eval mode on `device`."""
    from .models.families import family_hook
    from .models.loading import from_pretrained

    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    model = from_pretrained(setup.model_path, setup.family, setup.ids, dtype=dtype)
    if adaptor:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adaptor)
        family_hook(setup.family, "share_adaptors")(model)
    return model.to(device).eval()


def load_for_generation(
    model_name: str, adaptor: str | None, device: str, training_method: str = "auto"
) -> tuple[Any, Any, TokenIds, Method]:
    """(model, tokenizer, special ids, the method) ready to sample."""
    setup = prepare_generation(model_name, adaptor, training_method)
    model = load_weights(setup, adaptor, device)
    return model, setup.tokenizer, setup.ids, setup.method


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        check_arguments(args)
        setup = prepare_generation(args.model, args.adaptor)
        prompt_ids = check_against_model(args, setup)
        model = load_weights(setup, args.adaptor, args.device)
        config = SamplingConfig(
            max_new_tokens=args.max_new_tokens,
            steps=args.steps or args.max_new_tokens,
            block_size=setup.trained_block_size or min(args.block_size or 32, args.max_new_tokens),
            temperature=args.temperature,
            algorithm=args.algorithm or "low_confidence",  # Dream reads it as maskgit_plus
            seed=args.seed,
        )
        print(answer_ids(model, setup.tokenizer, setup.ids, setup.method, prompt_ids, config))
    except UserError as e:  # one clear line, non-zero exit
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Exception as e:
        traceback.print_exc()
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
