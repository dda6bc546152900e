"""The host's plugin harness: put the plugin folder on sys.path, import main, call main()."""

import argparse
import os
import sys

parser = argparse.ArgumentParser()
parser.add_argument("--plugin_dir", type=str, required=True)
parser.add_argument("--workspace_dir", type=str, required=False)
parser.add_argument("--job_id", type=str, default=None)
args, unknown = parser.parse_known_args()

if args.workspace_dir:
    os.environ["TFL_WORKSPACE_DIR"] = args.workspace_dir

sys.path.append(args.plugin_dir)
# Test hook: the host's own shared packages (its transformers 4.57), after the venv.
if os.environ.get("FAKE_TLAB_HOST_PACKAGES"):
    sys.path.append(os.environ["FAKE_TLAB_HOST_PACKAGES"])

import main  # noqa: E402

if "main" in dir(main) and callable(main.main):
    main.main()
