"""Transformer Lab entry point (plugin and task) and stand-alone command.

The plugin host's harness puts this folder on sys.path, does `import main` and then
calls `main.main()`; a Transformer Lab task runs `python main.py` (task.yaml);
stand-alone, run `python main.py --input_file job.json` (no file: the embedded demo).
Nothing runs at import.
"""

import json
import os
import sys

# The host starts us from its own folder: find our package next to this file.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# A training process our launcher started imports exactly what the launcher imports: its
# whole sys.path, in its order (set by dllm_plugin/launch/supervise.py), before any import.
if os.environ.get("DLLM_PARENT_SYS_PATH"):
    sys.path[:] = json.loads(os.environ["DLLM_PARENT_SYS_PATH"])


def main() -> None:
    from dllm_plugin.cli import main as run

    sys.exit(run(sys.argv[1:]))


if __name__ == "__main__":
    main()
