"""The embedded server: real Valkey, AOF persistence, address discovery."""

import socket

import pytest
import redis
from conftest import mounted_tmpfs

from rlhf_core import redis_server
from rlhf_core.redis_server import (
    EmbeddedValkey,
    RedisUnavailableError,
    connect,
    free_port,
    start_embedded_if_needed,
)
from rlhf_core.settings import Settings


def test_kill_9_keeps_every_acknowledged_write(tmp_path):
    """appendfsync always: every write the server answered survives SIGKILL."""
    server = EmbeddedValkey(tmp_path).start()
    client = redis.Redis.from_url(server.url)
    ids = [client.xadd("s", {"n": i}) for i in range(200)]
    server.kill()
    restarted = EmbeddedValkey(tmp_path, port=server.port).start()
    try:
        assert [entry_id for entry_id, _ in client.xrange("s")] == ids
    finally:
        restarted.stop()


def test_second_command_finds_the_embedded_server(tmp_path):
    settings = Settings(data_dir=tmp_path, redis_url=None)
    url, server = start_embedded_if_needed(settings)
    try:
        assert server is not None
        connect(settings).set("k", "v")
        # A second process with the same settings reuses it rather than starting another.
        url2, server2 = start_embedded_if_needed(settings)
        assert (url2, server2) == (url, None)
        assert connect(settings).get("k") == b"v"
    finally:
        server.stop()


def test_the_embedded_server_never_takes_the_port_the_ui_will_bind(tmp_path, monkeypatch):
    """`up` starts Valkey on a port the kernel offers, then the UI binds RLHF_PORT. Nothing
    holds RLHF_PORT in between, so the kernel may offer it to Valkey (it did, in CI: "Cannot
    find empty port in range: 51495-51495"). The kernel's pick is forced here to be the UI's
    port once; the bind itself is real."""
    ui_port = free_port()

    class OffersTheUiPortFirst(socket.socket):
        offered = False

        def bind(self, address):
            if address == ("127.0.0.1", 0) and not OffersTheUiPortFirst.offered:
                OffersTheUiPortFirst.offered = True
                address = ("127.0.0.1", ui_port)
            super().bind(address)

    monkeypatch.setattr(redis_server.socket, "socket", OffersTheUiPortFirst)
    settings = Settings(data_dir=tmp_path, redis_url=None, port=ui_port)
    _, server = start_embedded_if_needed(settings)
    monkeypatch.undo()
    try:
        assert OffersTheUiPortFirst.offered
        assert server is not None and server.port != ui_port
        with socket.socket() as ui:
            ui.bind(("127.0.0.1", ui_port))  # the UI's port is still there for the UI
        connect(Settings(data_dir=tmp_path, redis_url=None)).ping()
    finally:
        server.stop()


def test_no_server_gives_an_error_that_says_what_to_do(tmp_path):
    with pytest.raises(RedisUnavailableError, match="rlhf-chat up"):
        connect(Settings(data_dir=tmp_path, redis_url=None))


def test_a_server_that_can_lose_saved_feedback_is_named(tmp_path, valkey):
    """RLHF_REDIS_URL at a plain `redis-server` (no append-only file, snapshots now and then):
    a vote the UI reported saved was gone after the server was killed and restarted, and
    nothing had said the server could do that (review, session 26). `rlhf-chat status` and
    the UI's start now name each such setting and what to set instead."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    port = free_port()
    server = subprocess.Popen(
        [redis_server.valkey_binary(), "--port", str(port), "--bind", "127.0.0.1",
         "--requirepass", "pw", "--dir", str(tmp_path), "--appendonly", "no",
         "--appendfsync", "everysec", "--maxmemory-policy", "allkeys-lru"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        url = f"redis://:pw@127.0.0.1:{port}/0"
        client = redis.Redis.from_url(url)
        for _ in range(100):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                import time

                time.sleep(0.05)
        env = dict(os.environ, RLHF_REDIS_URL=url, RLHF_DATA_DIR=str(tmp_path / "data"))
        done = subprocess.run(
            [sys.executable, "-m", "chat_ui", "status"], env=env, capture_output=True,
            text=True, timeout=120, cwd=Path(__file__).resolve().parents[1],
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert "appendonly yes" in done.stdout and "maxmemory-policy noeviction" in done.stdout
        warnings = redis_server.durability_warnings(client)
        assert len(warnings) == 2, warnings  # no AOF at all: its fsync policy is moot
        client.config_set("appendonly", "yes")
        client.config_set("maxmemory-policy", "noeviction")
        (warning,) = redis_server.durability_warnings(client)
        assert "appendfsync always" in warning
    finally:
        server.kill()
        server.wait()
    # The embedded server (appendfsync always, noeviction): nothing to say.
    assert redis_server.durability_warnings(redis.Redis.from_url(valkey.url)) == []


def test_a_full_disk_is_named_when_the_server_exits(tmp_path):
    """On a full disk Valkey (appendfsync always) exits rather than answer a write it could
    not make durable, and `rlhf-chat up` restarts it again and again. It said only "exited
    with code 1"; the reason was in a log file it did not name (review, session 26)."""
    disk = tmp_path / "disk"
    with mounted_tmpfs(disk, "size=2m", "filling a disk needs a small tmpfs"):
        assert_the_full_disk_is_named(disk)
    # Killed by a signal, nothing of it in the log: the signal says why.
    server = EmbeddedValkey(tmp_path / "other").start()
    server.kill()
    assert "killed by signal 9" in server.exit_reason()


def assert_the_full_disk_is_named(disk):
    server = EmbeddedValkey(disk / "data")
    try:
        server.start()
        client = redis.Redis.from_url(server.url, socket_timeout=5)
        client.set("before", "kept")
        with pytest.raises(OSError):
            (disk / "fill").write_bytes(b"\0" * 4 * 2**20)
        with pytest.raises(redis.ConnectionError):
            client.set("after", "x" * 10_000)
        server.process.wait(timeout=10)
        reason = server.exit_reason()
        assert "exited with code 1" in reason
        assert "AOF write error" in reason and str(disk / "data" / "valkey.log") in reason
    finally:
        server.kill()
