"""A task process whose training step does not end after the app's Stop (think of a
large model's step): the task host's watchdog must still end it with status 0, within
its grace period, with the run summary saying stopped. Run as task.yaml's `run` would
be, from the job's home (its dllm_plugin is this checkout's)."""

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path.cwd()))

from dllm_plugin import signals  # noqa: E402
from dllm_plugin.hosts import forward_logs  # noqa: E402
from dllm_plugin.hosts.task import TaskHost  # noqa: E402
from dllm_plugin.jobdir import write_summary  # noqa: E402

host = TaskHost()
with forward_logs(host):
    raw = host.raw_config()  # lab.init; the watchdog starts
    output_dir = Path(raw["output_dir"])
    output_dir.mkdir(parents=True)
    write_summary(output_dir, {"status": "running"})
    # As in training: a stop signal only asks the step to end.
    with signals.handling(lambda signum, frame: print("stop requested", flush=True)):
        print("training", flush=True)
        time.sleep(60)  # the step that does not end
print(json.dumps({"not": "reached"}))
sys.exit(3)
