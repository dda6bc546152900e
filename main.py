"""Transformer Lab plugin entry point.

The host's harness puts this folder on sys.path, does `import main` and then calls
`main.main()`; stand-alone, run `python main.py --input_file job.json` (no file: the
embedded demo). Nothing runs at import.
"""

import os
import sys

# The host starts us from its own folder: find our package next to this file.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    from dllm_plugin.cli import main as run

    sys.exit(run(sys.argv[1:]))


if __name__ == "__main__":
    main()
