"""What Transformer Lab's server does around a task's process, emulated with the real SDK.

Run as a script (`python tests/tlab_app/app.py COMMAND ...`, one JSON answer on stdout),
so that the real `lab` package (PyPI transformerlab 0.1.46) is only ever imported in a
subprocess, away from tests/fake_tlab's plugin-era `lab`. Each step follows the app's
source (transformerlab-app db4ce3084; ../shared/facts/transformerlab-tasks.md):

- create-job: job_service.job_create (REMOTE, LAUNCHING) and the job data that
  launch_template.py writes (parameters = the task's parameters overlaid with the launch
  config, LT:530-552; run, cluster_name, provider fields, start_time, LT:620-660).
- stop: job_service.job_stop (job_data.stop = true, then STOPPING, 460-463); the signals
  (SIGTERM to the tree, SIGKILL 3 s later) are sent by the test (process_registry.py).
- settle: the remote job status worker once the process has ended (SW:209-264 for the
  trap's live_status; the Local provider's check for a vanished process, SW:455-485).
- resume: remote_job_endpoints_service.resume_remote_job_from_checkpoint (97-171).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time

from lab import Experiment, Job
from lab.dirs import get_job_checkpoints_dir
from lab.job_status import JobStatus

ACTIVE = (JobStatus.LAUNCHING, JobStatus.RUNNING, JobStatus.STOPPING, JobStatus.INTERACTIVE)
RESUMED_FIELDS = (  # the parent job's fields a resumed job gets (resume service, 146-168)
    "run",
    "task_name",
    "subtype",
    "cpus",
    "memory",
    "disk_space",
    "accelerators",
    "num_nodes",
    "setup",
    "env_vars",
    "file_mounts",
    "parameters",
    "provider_id",
    "provider_type",
    "provider_name",
    "github_repo_url",
    "github_repo_dir",
    "github_repo_branch",
    "user_info",
    "team_id",
)


async def create_job(experiment: str, job_data: dict) -> str:
    exp = await Experiment.create_or_get(experiment, create_new=True)
    job = await exp.create_job(type="REMOTE")
    await job.set_type("REMOTE")
    await job.update_status(JobStatus.LAUNCHING)
    await job.update_job_data_fields(
        {
            "provider_id": "local-provider",
            "provider_type": "local",
            "provider_name": "Local",
            "cluster_name": f"local-{job.id[:8]}",
            "start_time": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
            **job_data,
        }
    )
    return job.id


async def stop(experiment: str, job_id: str) -> None:
    job = await Job.get(job_id, experiment)
    await job.update_job_data_field("stop", True)
    await job.update_status(JobStatus.STOPPING)


async def settle(experiment: str, job_id: str) -> str:
    """The status worker's verdict on a job whose process tree has ended."""
    job = await Job.get(job_id, experiment)
    record = await job.get_json_data(uncached=True)
    status, live = record.get("status"), (record.get("job_data") or {}).get("live_status")
    if status not in ACTIVE:
        return str(status)
    if live in ("Remote command finished", "Remote command crashed"):
        finished = live == "Remote command finished"
        if status == JobStatus.STOPPING:
            new = JobStatus.STOPPED if finished else JobStatus.FAILED
        else:
            new = JobStatus.COMPLETE if finished else JobStatus.FAILED
    else:  # the trap was killed too: the Local provider sees the process gone
        new = JobStatus.STOPPED if status == JobStatus.STOPPING else JobStatus.COMPLETE
    await job.update_status(new)
    return new.value


async def resume(experiment: str, job_id: str, checkpoint: str) -> str:
    parent = await Job.get(job_id, experiment)
    data = (await parent.get_json_data(uncached=True)).get("job_data") or {}
    checkpoints = await get_job_checkpoints_dir(job_id, experiment)
    if not os.path.exists(os.path.join(checkpoints, checkpoint)):
        raise SystemExit(f"Checkpoint '{checkpoint}' not found")
    fields = {f: data[f] for f in RESUMED_FIELDS if data.get(f) is not None}
    fields.update(parent_job_id=job_id, resumed_from_checkpoint=checkpoint)
    return await create_job(experiment, fields)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("command", choices=["create-job", "stop", "settle", "resume"])
    parser.add_argument("--experiment", required=True)
    parser.add_argument("--job-id")
    parser.add_argument("--checkpoint")
    parser.add_argument("--job-data", help="JSON object")
    args = parser.parse_args()
    if args.command == "create-job":
        answer = asyncio.run(create_job(args.experiment, json.loads(args.job_data)))
    elif args.command == "stop":
        answer = asyncio.run(stop(args.experiment, args.job_id))
    elif args.command == "settle":
        answer = asyncio.run(settle(args.experiment, args.job_id))
    else:
        answer = asyncio.run(resume(args.experiment, args.job_id, args.checkpoint))
    print(json.dumps(answer))


if __name__ == "__main__":
    main()
