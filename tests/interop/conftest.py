"""Interoperability fixtures: @grpc/grpc-js installed from tests/interop/node's lock file.

Node and npm are requirements of this suite, not options: when either is
missing or `npm ci` fails, the tests fail with the reason (never skip).
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

NODE_DIR = Path(__file__).resolve().parent / "node"
MODULES = NODE_DIR / "node_modules"
# Written after a successful `npm ci`; older than the lock file means stale.
STAMP = MODULES / ".installed-from-lock"
INSTALL_TIMEOUT = 180.0


@dataclass(frozen=True)
class NodeTools:
    """The node executable and the directory of the interop scripts."""

    node: str
    directory: Path

    def script(self, name: str) -> str:
        return str(self.directory / name)


def _installed() -> bool:
    if not STAMP.exists():
        return False
    inputs = max(
        (NODE_DIR / name).stat().st_mtime for name in ("package.json", "package-lock.json")
    )
    return STAMP.stat().st_mtime >= inputs


def _npm_ci(npm: str) -> None:
    try:
        result = subprocess.run(
            # --prefer-offline: packages already in npm's cache need no network.
            [npm, "ci", "--prefer-offline", "--no-audit", "--no-fund"],
            cwd=NODE_DIR,
            capture_output=True,
            text=True,
            timeout=INSTALL_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"`npm ci` in {NODE_DIR} did not finish within {INSTALL_TIMEOUT:.0f} s")
    if result.returncode != 0:
        pytest.fail(
            f"`npm ci` in {NODE_DIR} failed with exit code {result.returncode}:\n"
            f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
        )
    STAMP.touch()


@pytest.fixture(scope="session")
def node_tools() -> NodeTools:
    """Node with the lock file's @grpc/grpc-js installed (by `npm ci` when missing or stale)."""
    node = shutil.which("node")
    npm = shutil.which("npm")
    if node is None or npm is None:
        pytest.fail(
            "the interop tests need Node.js and npm on PATH "
            f"(node: {node or 'missing'}, npm: {npm or 'missing'})"
        )
    if not _installed():
        _npm_ci(npm)
    return NodeTools(node, NODE_DIR)
