"""``cloudstate-proxy events`` as a user runs it: a subprocess reading the journal."""

from __future__ import annotations

import asyncio
import base64
import json
import signal
import sys
from pathlib import Path
from typing import Any

import pytest

from cloudstate_proxy.journal import EventData, PostgresStore, SqliteStore, Store
from examples.tck.eventsourced_pb2 import Persisted
from tests.proxy.edge.edge_support import free_port, tck_spec
from tests.support.fake_user_function import FakeUserFunction

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]
PID = "event-sourced-tck-model"
PERSISTED_URL = "type.googleapis.com/cloudstate.tck.model.Persisted"


def persisted(value: str) -> EventData:
    return EventData(PERSISTED_URL, Persisted(value=value).SerializeToString())


async def run_cli(*args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cloudstate_proxy",
        "events",
        *args,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(30):
        out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def fill(store: Store) -> None:
    await store.append(PID, "cart-1", 0, [persisted("a"), persisted("b")])
    await store.append("other", "cart-1", 0, [EventData("type.googleapis.com/x.Y", b"\x01\x02")])
    await store.append(PID, "cart-2", 0, [persisted("c")])


@pytest.fixture
async def sqlite_url(tmp_path: Path) -> str:
    path = tmp_path / "journal.db"
    async with SqliteStore(path) as store:
        await fill(store)
    return f"sqlite://{path}"


def records(out: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.splitlines()]


async def test_prints_the_log_as_json_and_text(sqlite_url: str) -> None:
    code, out, _ = await run_cli("--journal-url", sqlite_url, "--format", "json")
    assert code == 0
    printed = records(out)
    assert [(r["offset"], r["persistence_id"], r["entity_id"], r["sequence"]) for r in printed] == [
        (1, PID, "cart-1", 1),
        (2, PID, "cart-1", 2),
        (3, "other", "cart-1", 1),
        (4, PID, "cart-2", 1),
    ]
    assert base64.b64decode(printed[2]["payload_base64"]) == b"\x01\x02"
    assert printed[0]["type_url"] == PERSISTED_URL and printed[0]["written_at"].endswith("Z")

    code, out, _ = await run_cli("--journal-url", sqlite_url)
    assert code == 0
    lines = out.splitlines()
    assert len(lines) == 4
    first = lines[0].split()
    assert first[:4] == ["1", f"{PID}/cart-1", "seq", "1"]
    assert first[5] == "cloudstate.tck.model.Persisted" and first[6].startswith("base64:")


async def test_filters(sqlite_url: str) -> None:
    async def offsets(*args: str) -> list[int]:
        code, out, err = await run_cli("--journal-url", sqlite_url, "--format", "json", *args)
        assert code == 0, err
        return [r["offset"] for r in records(out)]

    assert await offsets("--persistence-id", PID) == [1, 2, 4]
    assert await offsets("--persistence-id", PID, "--entity-id", "cart-1") == [1, 2]
    assert await offsets("--after-offset", "2") == [3, 4]
    assert await offsets("--persistence-id", "nobody") == []


async def test_decodes_payloads_with_the_user_functions_types(sqlite_url: str) -> None:
    async with FakeUserFunction(tck_spec()) as user_function:
        code, out, err = await run_cli(
            "--journal-url",
            sqlite_url,
            "--format",
            "json",
            "--user-function-port",
            str(user_function.port),
        )
    assert code == 0, err
    printed = records(out)
    assert [r.get("payload") for r in printed] == [
        {"value": "a"},
        {"value": "b"},
        None,  # a type the user function does not declare stays bytes
        {"value": "c"},
    ]
    code, out, err = await run_cli(
        "--journal-url", sqlite_url, "--user-function-port", str(free_port())
    )
    assert code == 0 and "base64:" in out  # unreachable: says so, prints bytes
    assert "printing payloads as base64" in err


async def test_follow_prints_new_events_until_interrupted(postgres_database: str) -> None:
    async with PostgresStore(postgres_database) as store:
        await fill(store)
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "cloudstate_proxy",
            "events",
            "--journal-url",
            postgres_database,
            "--persistence-id",
            PID,
            "--follow",
            "--format",
            "json",
            cwd=ROOT,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        assert process.stdout is not None
        try:
            async with asyncio.timeout(30):
                seen = [json.loads(await process.stdout.readline()) for _ in range(3)]
                await store.append(PID, "cart-2", 1, [persisted("d")])
                await store.append("other", "cart-9", 0, [persisted("x")])
                await store.append(PID, "cart-3", 0, [persisted("e")])
                seen += [json.loads(await process.stdout.readline()) for _ in range(2)]
                process.send_signal(signal.SIGINT)
                assert await process.wait() == 0
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
    assert [r["offset"] for r in seen] == [1, 2, 4, 5, 7]
    assert [r["entity_id"] for r in seen[3:]] == ["cart-2", "cart-3"]


async def test_unreadable_journals_fail_with_a_message(tmp_path: Path) -> None:
    code, out, err = await run_cli("--journal-url", f"sqlite://{tmp_path / 'missing.db'}")
    assert (code, out) == (1, "") and "no journal at" in err
    assert not (tmp_path / "missing.db").exists()
    code, _, err = await run_cli(
        "--journal-url", f"postgresql://postgres:secret@127.0.0.1:{free_port()}/x"
    )
    assert code == 1 and "cloudstate-proxy events:" in err and "secret" not in err


@pytest.mark.parametrize(
    "args",
    [
        ["--entity-id", "e"],
        ["--after-offset", "-1"],
        ["--after-offset", "many"],
        ["--format", "xml"],
        ["--journal-url", "mysql://db/x"],
        ["--user-function-port", "0"],
    ],
)
async def test_bad_flags_exit_2(args: list[str]) -> None:
    code, _, err = await run_cli(*args)
    assert code == 2 and "usage:" in err


async def test_help_documents_every_flag() -> None:
    code, out, _ = await run_cli("--help")
    assert code == 0
    for flag in (
        "--journal-url",
        "--state-dir",
        "--persistence-id",
        "--entity-id",
        "--after-offset",
        "--follow",
        "--format",
        "--user-function-host",
        "--user-function-port",
    ):
        assert flag in out
