"""A real Postgres for tests, one fresh database per test, and ways to hurt it.

Where the server comes from (`provide_postgres`, behind the ``postgres_url``
session fixture), first that works:

1. ``DATABASE_URL`` when set (it must answer: no fallback hides a typo);
2. the local server at ``postgresql://postgres@127.0.0.1:5432/test`` (trust auth);
3. a throwaway server started from the installed binaries
   (``/usr/lib/postgresql/*/bin``): initdb into a temporary directory, pg_ctl
   start on a free port, removed at the end of the session. As root the
   binaries run as the ``postgres`` user, which owns the directory.

If none works the session fails with every reason; tests never skip for it.
``CLOUDSTATE_TEST_POSTGRES=throwaway`` skips straight to 3 (a private server
that no other test run shares).

`fresh_database` creates an empty database on the server for one test and
drops it afterwards, so tests never see each other's rows.

Restarting (for "Postgres restarts under load" tests): `restart_postgres(url)`
restarts the server behind ``url`` when it runs on this machine and is either
a throwaway server (pg_ctl restart) or a Debian cluster listed by
pg_lsclusters (pg_ctlcluster restart); `can_restart_postgres(url)` tells
whether that is possible. Restarting the shared local cluster disturbs every
other client of it: tests that restart should prefer their own
`ThrowawayPostgres`. `TcpProxy` simulates outages without restarting anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from glob import glob
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit, urlunsplit

import asyncpg

T = TypeVar("T")

LOCAL_URL = "postgresql://postgres@127.0.0.1:5432/test"
# Marks a throwaway server's directory, so restart_postgres recognises it.
_MARKER = "cloudstate-test-postgres"


class PostgresUnavailableForTests(RuntimeError):
    """No Postgres could be found or started for the test session."""


# -- finding or starting a server -------------------------------------------


@contextlib.contextmanager
def provide_postgres() -> Iterator[str]:
    """Yield the URL of a Postgres server for the test session (see module doc)."""
    env_url = os.environ.get("DATABASE_URL")
    if env_url:
        problem = probe(env_url)
        if problem:
            raise PostgresUnavailableForTests(f"DATABASE_URL does not answer: {problem}")
        yield env_url
        return
    if os.environ.get("CLOUDSTATE_TEST_POSTGRES") == "throwaway":
        local_problem: str | None = "not tried (CLOUDSTATE_TEST_POSTGRES=throwaway)"
    else:
        local_problem = probe(LOCAL_URL)
    if local_problem is None:
        yield LOCAL_URL
        return
    server = ThrowawayPostgres()
    try:
        server.start()
    except Exception as exc:
        raise PostgresUnavailableForTests(
            "no Postgres for the tests: DATABASE_URL is unset, "
            f"{LOCAL_URL} does not answer ({local_problem}), "
            f"and starting a throwaway server failed: {exc}"
        ) from exc
    try:
        yield server.url
    finally:
        server.stop()


def probe(url: str, timeout: float = 3.0) -> str | None:
    """None when ``url`` accepts a connection and a query, else why not.

    Runs on a private thread and event loop, so it is safe to call from
    synchronous fixtures while pytest-asyncio manages its own loops.
    """

    async def attempt() -> None:
        conn = await asyncpg.connect(url, timeout=timeout)
        try:
            await conn.fetchval("SELECT 1", timeout=timeout)
        finally:
            await conn.close(timeout=timeout)

    try:
        run_isolated(attempt)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def run_isolated(make: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine to completion on a fresh loop in a fresh thread."""
    with ThreadPoolExecutor(max_workers=1) as executor:
        return executor.submit(lambda: asyncio.run(make())).result()


class ThrowawayPostgres:
    """A private Postgres server in a temporary directory, for one test session
    (or one test that wants to restart a server without disturbing others).

    ``start()`` runs initdb and pg_ctl start (blocking, a few seconds);
    ``stop()`` stops it immediately and deletes the directory.
    """

    def __init__(self) -> None:
        self.bin_dir = find_bin_dir()
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="cloudstate-pg-"))
        self.data_dir = self.root / "data"
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/test"

    def start(self) -> None:
        (self.root / _MARKER).touch()
        if os.geteuid() == 0:
            account = pwd.getpwnam("postgres")
            for path in (self.root, self.root / _MARKER):
                os.chown(path, account.pw_uid, account.pw_gid)
        self._run("initdb", "-D", str(self.data_dir), "-U", "postgres", "-A", "trust")
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1"
        self._run(
            "pg_ctl",
            *("-D", str(self.data_dir), "-l", str(self.root / "server.log")),
            *("-o", options, "-w", "-t", "60", "start"),
        )
        admin = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

        async def create_test_database() -> None:
            conn = await asyncpg.connect(admin, timeout=10)
            try:
                await conn.execute("CREATE DATABASE test")
            finally:
                await conn.close()

        run_isolated(create_test_database)

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self._run("pg_ctl", "-D", str(self.data_dir), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> ThrowawayPostgres:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _run(self, program: str, *args: str) -> None:
        command = [*_as_owner(self.root), str(self.bin_dir / program), *args]
        result = subprocess.run(command, capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed: {result.stderr or result.stdout}")


def find_bin_dir() -> Path:
    """The newest installed PostgreSQL server binaries (initdb, pg_ctl)."""
    candidates = sorted(
        (Path(p) for p in glob("/usr/lib/postgresql/*/bin")),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
    )
    for bin_dir in reversed(candidates):
        if (bin_dir / "initdb").exists() and (bin_dir / "pg_ctl").exists():
            return bin_dir
    on_path = shutil.which("initdb")
    if on_path:
        return Path(on_path).parent
    raise FileNotFoundError("no PostgreSQL server binaries (initdb, pg_ctl) installed")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _as_owner(path: Path) -> list[str]:
    """A command prefix that runs a program as the owner of ``path`` (Postgres
    refuses to run as root; from root, ``runuser`` switches user)."""
    owner = path.stat().st_uid
    if os.geteuid() != 0 or owner == 0:
        return []
    return ["runuser", "-u", pwd.getpwuid(owner).pw_name, "--"]


# -- a database per test ------------------------------------------------------


@contextlib.asynccontextmanager
async def fresh_database(server_url: str) -> AsyncIterator[str]:
    """Create an empty database on ``server_url``'s server; yield its URL; drop it."""
    name = f"test_{secrets.token_hex(6)}"
    # template0: template1 may be busy (CREATE DATABASE needs it unused).
    await _admin(server_url, f'CREATE DATABASE "{name}" TEMPLATE template0')
    try:
        yield with_database(server_url, name)
    finally:
        await _admin(server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def with_database(url: str, database: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{database}"))


async def _admin(url: str, statement: str) -> None:
    conn = await asyncpg.connect(url, timeout=10)
    try:
        await conn.execute(statement, timeout=30)
    finally:
        await conn.close(timeout=10)


# -- restarting ---------------------------------------------------------------


async def can_restart_postgres(url: str) -> bool:
    """Whether `restart_postgres` can restart the server behind ``url``."""
    return await _restart_command(url) is not None


async def restart_postgres(url: str, within: float = 60.0) -> None:
    """Restart (fast shutdown, then start) the server behind ``url`` and wait
    until it accepts connections again. Connections to it break meanwhile.

    Raises RuntimeError when the server cannot be restarted from here (not on
    this machine, or neither a throwaway server nor a pg_lsclusters cluster).
    """
    command = await _restart_command(url)
    if command is None:
        raise RuntimeError(f"cannot restart the Postgres server behind {url}")
    process = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    output, _ = await asyncio.wait_for(process.communicate(), within)
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {output.decode(errors='replace')}")
    deadline = time.monotonic() + within
    while (problem := await asyncio.to_thread(probe, url)) is not None:
        if time.monotonic() > deadline:
            raise RuntimeError(f"Postgres did not come back after a restart: {problem}")
        await asyncio.sleep(0.2)


async def _restart_command(url: str) -> list[str] | None:
    host = urlsplit(url).hostname or "localhost"
    if host not in ("127.0.0.1", "localhost", "::1") and not host.startswith("/"):
        return None
    try:
        conn = await asyncpg.connect(url, timeout=5)
        try:
            data_dir = Path(await conn.fetchval("SHOW data_directory"))
        finally:
            await conn.close()
    except Exception:  # not a superuser, or not reachable: no way to restart
        return None
    return _restart_plan(data_dir, await _debian_cluster(data_dir))


def _restart_plan(data_dir: Path, cluster: tuple[str, str] | None) -> list[str] | None:
    if (data_dir.parent / _MARKER).exists():
        return [
            *_as_owner(data_dir),
            str(find_bin_dir() / "pg_ctl"),
            *("-D", str(data_dir), "-l", str(data_dir.parent / "server.log")),
            *("-m", "fast", "-w", "-t", "60", "restart"),
        ]
    if cluster is None or os.geteuid() not in (0, data_dir.stat().st_uid):
        return None
    version, name = cluster
    return ["pg_ctlcluster", "--skip-systemctl-redirect", version, name, "restart"]


async def _debian_cluster(data_dir: Path) -> tuple[str, str] | None:
    if shutil.which("pg_lsclusters") is None:
        return None
    process = await asyncio.create_subprocess_exec(
        "pg_lsclusters", "--no-header", stdout=asyncio.subprocess.PIPE
    )
    output, _ = await process.communicate()
    for line in output.decode().splitlines():
        fields = line.split()
        if len(fields) >= 6 and Path(fields[5]) == data_dir:
            return fields[0], fields[1]
    return None


# -- outages without restarts -------------------------------------------------

LinkMode = Literal["up", "down", "blackhole"]


class TcpProxy:
    """Forwards a local port to a server, and can fail like a network.

    ``mode``: "up" forwards; "down" drops every link and resets new ones (a
    crashed server); "blackhole" keeps links open but passes nothing (a hung
    server or a partition). Owns its tasks: `close` ends them all.
    """

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.mode: LinkMode = "up"
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    @classmethod
    def for_url(cls, url: str) -> TcpProxy:
        parts = urlsplit(url)
        return cls(parts.hostname or "127.0.0.1", parts.port or 5432)

    @property
    def port(self) -> int:
        assert self._server is not None, "start() first"
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    def url_through(self, url: str) -> str:
        """``url`` with its host and port replaced by this proxy's."""
        parts = urlsplit(url)
        userinfo = parts.netloc.rpartition("@")[0]
        netloc = f"{userinfo}@127.0.0.1:{self.port}" if userinfo else f"127.0.0.1:{self.port}"
        return urlunsplit(parts._replace(netloc=netloc))

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)

    def set_mode(self, mode: LinkMode) -> None:
        self.mode = mode
        if mode == "down":
            for writer in list(self._writers):
                writer.transport.abort()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def __aenter__(self) -> TcpProxy:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.mode == "down":
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update((writer, up_writer))
        for source, sink in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.get_running_loop().create_task(self._pump(source, sink))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pump(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        try:
            while chunk := await source.read(65536):
                if self.mode == "up":
                    sink.write(chunk)
                    await sink.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            sink.transport.abort()
            self._writers.discard(sink)
