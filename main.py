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


def _print_exception_whole_lines(kind, value, tb) -> None:
    """sys.excepthook of a launched training process. The processes share one output
    pipe, and Python prints a traceback piece by piece, so another rank's output can land
    inside this one's exception line: the line the launcher reports as the reason when a
    process dies before it can write one (at an import, say). Each part goes out in one
    write instead (a pipe write of up to PIPE_BUF bytes is never split)."""
    import traceback

    lines = traceback.format_exception(kind, value, tb)
    last = traceback.format_exception_only(kind, value)
    parts = [lines[: -len(last)], last] if lines[-len(last) :] == last else [lines]
    try:
        sys.stderr.flush()
        for part in parts:
            os.write(2, "".join(part).encode(errors="replace"))
    except OSError:
        sys.__excepthook__(kind, value, tb)


# A training process our launcher started imports exactly what the launcher imports: its
# whole sys.path, in its order (set by dllm_plugin/launch/supervise.py), before any import.
if os.environ.get("DLLM_PARENT_SYS_PATH"):
    sys.path[:] = json.loads(os.environ["DLLM_PARENT_SYS_PATH"])
    sys.excepthook = _print_exception_whole_lines


def main() -> None:
    from dllm_plugin.cli import main as run

    sys.exit(run(sys.argv[1:]))


if __name__ == "__main__":
    main()
