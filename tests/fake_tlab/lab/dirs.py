"""Workspace paths: TFL_WORKSPACE_DIR, as the real `lab.dirs` honours it."""

import os


async def get_workspace_dir() -> str:
    return os.environ["TFL_WORKSPACE_DIR"]


def workspace_dir() -> str:
    return os.environ["TFL_WORKSPACE_DIR"]
