"""Running this folder's Node.js scripts (npm ``bullmq``) from tests."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent


def node_binary() -> str:
    """The node binary, with this folder's npm dependencies installed (skips without Node)."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("Node.js/npm are not installed")
    if not (HERE / "node_modules" / "bullmq").is_dir():
        subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=HERE,
            check=True,
            capture_output=True,
            timeout=300,
        )
    return node


async def run_node(node: str, script: str, *args: str) -> Any:
    """Run ``script`` (in this folder) with ``args``; its last line of output, as JSON."""
    proc = await asyncio.create_subprocess_exec(
        node,
        script,
        *args,
        cwd=HERE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode()
    return json.loads(out.decode().strip().splitlines()[-1])
