"""`rlhf-chat up` owns its children: they die with it (kill -9 included), a dead child
comes back on the same files, a stop takes well under Docker's 10 s, and a restart on
the same data folder after kill -9 works."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from gradio_client import Client

from tests.conftest import start_up, wait_for
from tests.test_cli import alive, children_of, rlhf_chat

pytestmark = pytest.mark.integration


def descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        for child in children_of(todo.pop()):
            out.append(child)
            todo.append(child)
    return out


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def wait_for_worker(up: subprocess.Popen, log: Path) -> None:
    # The worker is up when its pool child exists (Celery forks it once ready).
    wait_for(lambda: len(descendants(up.pid)) >= 3, 120, "valkey + worker + pool child", log)


def turns(env: dict[str, str]) -> int:
    done = rlhf_chat("status", "--json", env=env)
    return json.loads(done.stdout)["turns"] if done.returncode == 0 else -1


def test_up_owns_its_children(tmp_path, up_env):
    log = tmp_path / "up.log"
    url = f"http://127.0.0.1:{up_env['RLHF_PORT']}/"
    up = start_up(up_env, log)
    try:
        wait_for_worker(up, log)
        Client(url, verbose=False).predict("Hello", "", 1.0, 0.9, 6, api_name="/send")
        assert turns(up_env) == 1

        # A dead child comes back on the same files (and the same port: clients reconnect).
        (valkey,) = [p for p in descendants(up.pid) if "valkey" in cmdline(p)]
        os.kill(valkey, signal.SIGKILL)
        wait_for(lambda: [p for p in descendants(up.pid) if "valkey" in cmdline(p)
                          and p != valkey], 30, "Valkey restarted", log)  # fmt: skip
        wait_for(lambda: turns(up_env) == 1, 30, "the data back", log)
        Client(url, verbose=False).predict("Again", "", 1.0, 0.9, 6, api_name="/send")
        assert turns(up_env) == 2

        # kill -9 of `up`: no orphans (they held the port and the append-only files).
        children = descendants(up.pid)
        os.kill(up.pid, signal.SIGKILL)
        up.wait(timeout=10)
        wait_for(lambda: not any(alive(p) for p in children), 15, "the children to die", log)
    finally:
        if up.poll() is None:
            up.kill()

    # A restart on the same data folder works and finds the data.
    up = start_up(up_env, log)
    try:
        wait_for_worker(up, log)
        assert turns(up_env) == 2
        Client(url, verbose=False).predict("Third", "", 1.0, 0.9, 6, api_name="/send")
        children = descendants(up.pid)
        started = time.monotonic()
        up.send_signal(signal.SIGTERM)
        code = up.wait(timeout=10)
        took = time.monotonic() - started
    finally:
        if up.poll() is None:
            up.kill()
    assert code == 0 and took < 8.5, (took, log.read_text()[-2000:])
    assert not any(alive(p) for p in children), "children outlived `rlhf-chat up`"
    print(f"graceful stop of `rlhf-chat up`: {took:.1f} s")
