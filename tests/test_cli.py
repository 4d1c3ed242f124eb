"""`rlhf-chat` as a person runs it: separate processes that find the same data, and
the container's command (`rlhf-chat up`, as in the Dockerfile) run natively."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import redis
from conftest import mounted_tmpfs, start_up, tiny_env
from gradio_client import Client

from rlhf_core.datasets import read_jsonl
from rlhf_core.feedback import Event, FeedbackStore, Turn
from rlhf_core.redis_server import URL_FILE, EmbeddedValkey, free_port

ROOT = Path(__file__).resolve().parents[1]


def rlhf_chat(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "chat_ui", *args],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def children_of(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.fixture()
def embedded(tiny_settings):
    """A Valkey server for the settings' data dir, announced in <data_dir>/redis.url as
    `rlhf-chat up` does, and an env without RLHF_REDIS_URL: commands must find it."""
    server = EmbeddedValkey(Path(tiny_settings.data_dir)).start()
    server.write_url_file()
    env = tiny_env(tiny_settings)
    del env["RLHF_REDIS_URL"]
    yield server, env
    server.stop()


def test_status_and_export_from_another_process_find_the_data(embedded):
    server, env = embedded
    store = FeedbackStore(redis.Redis.from_url(server.url))
    turn = Turn("t1", "s1", "u1", [{"role": "user", "content": "Hi ✨"}], "Hello!", 0)
    store.save_turn(turn)
    store.record_event(Event("e1", "t1", "like", "s1", "u1"))

    done = rlhf_chat("status", env=env)
    assert done.returncode == 0, done.stderr
    assert re.search(r"turns:\s+1\b", done.stdout) and re.search(r"events:\s+1\b", done.stdout)
    assert re.search(r"current policy version:\s+0\b", done.stdout)
    info = json.loads(rlhf_chat("status", "--json", env=env).stdout)
    assert info["turns"] == 1 and info["unconsumed"] == 1 and info["current_version"] == 0

    out = Path(env["RLHF_DATA_DIR"]) / "kto.jsonl"
    done = rlhf_chat("export", "--format", "kto", "--out", str(out), env=env)
    assert done.returncode == 0, done.stderr
    rows = read_jsonl(out)
    assert rows == [
        {
            "prompt": [{"role": "user", "content": "Hi ✨"}],
            "completion": [{"role": "assistant", "content": "Hello!"}],
            "label": True,
        }
    ]


def test_commands_say_what_to_do_without_a_server(tmp_path):
    env = dict(os.environ, RLHF_DATA_DIR=str(tmp_path / "nothing-here"))
    env.pop("RLHF_REDIS_URL", None)
    done = rlhf_chat("status", env=env)
    assert done.returncode != 0
    assert "rlhf-chat up" in done.stderr and "RLHF_REDIS_URL" in done.stderr
    assert "Traceback" not in done.stderr
    done = rlhf_chat("export", "--format", "nope", "--out", "x.jsonl", env=env)
    assert done.returncode == 2 and "invalid choice" in done.stderr
    # A negative bootstrap count ended in numpy's traceback (review, session 25).
    for rounds in ("-1", "0", "many"):
        done = rlhf_chat("leaderboard", "--rounds", rounds, env=env)
        assert done.returncode == 2 and "whole number from 1 to 100000" in done.stderr
        assert "Traceback" not in done.stderr


def test_help_lists_every_command():
    # A "%" in one command's help ("95% intervals") made argparse's %-formatting raise a
    # TypeError for `rlhf-chat --help` (review, session 26).
    from chat_ui.__main__ import COMMANDS

    done = rlhf_chat("--help", env=dict(os.environ))
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    for name, *_ in COMMANDS:
        assert re.search(rf"^\s+{name}\s", done.stdout, re.M), name
    assert "95% intervals" in done.stdout


def test_up_says_when_it_cannot_write_the_data_folder(tmp_path, up_env):
    # A data folder on a read-only mount (or one a file stands in the way of) ended `up` in
    # an OSError traceback from mkdir (review, session 26).
    (tmp_path / "a-file").write_text("")
    env = dict(up_env, RLHF_DATA_DIR=str(tmp_path / "a-file" / "data"))
    done = rlhf_chat("up", env=env)
    assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr
    assert "RLHF_DATA_DIR" in done.stderr and str(tmp_path / "a-file" / "data") in done.stderr


@pytest.mark.parametrize(
    "bad",
    [
        {"RLHF_MESSAGE_RATE": "lots"},
        {"RLHF_AUTH": "gradio", "RLHF_AUTH_USERS": "bob"},
        {"RLHF_AUTH": "hf", "RLHF_HOST": "0.0.0.0"},
        {"RLHF_SERVING_BACKEND": "vllm"},
    ],
)
def test_ui_refuses_bad_settings_without_a_traceback(tiny_settings, bad):
    # Each had a message saying what to do, at the end of a traceback (review, session 26).
    env = dict(tiny_env(tiny_settings), RLHF_PORT=str(free_port()), **bad)
    done = rlhf_chat("ui", env=env)
    assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr
    assert next(iter(bad)) in done.stderr


def test_a_port_given_on_the_command_line_is_checked_as_rlhf_port_is(tiny_settings):
    # The final review of session 26: --port skipped the range check RLHF_PORT gets.
    done = rlhf_chat("ui", "--port", "70000", env=tiny_env(tiny_settings))
    assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr
    assert "RLHF_PORT=70000" in done.stderr


def test_ui_says_when_its_redis_is_unreachable(tiny_settings):
    # A UI replica started before its Redis (or with a wrong host in RLHF_REDIS_URL) ended
    # in redis-py's ConnectionError traceback (review, session 26).
    url = f"redis://127.0.0.1:{free_port()}/0"
    env = dict(tiny_env(tiny_settings), RLHF_PORT=str(free_port()), RLHF_REDIS_URL=url)
    done = rlhf_chat("ui", env=env)
    assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr
    assert "unreachable" in done.stderr and "RLHF_REDIS_URL" in done.stderr


def test_a_persistent_folder_that_cannot_be_written_is_named(tmp_path):
    # A Space's /data mounted read-only (or owned by another user): the data went to the
    # container's own folder, lost at the next restart, and nothing said so (review,
    # session 26).
    persistent = tmp_path / "persistent"
    with mounted_tmpfs(
        persistent, "size=1m,ro", "a read-only folder for root is a read-only mount"
    ):
        env = dict(os.environ, RLHF_DATA_DIR=str(tmp_path / "home"), RLHF_REDIS_URL="")
        done = rlhf_chat("--prefer-data-dir", str(persistent), "status", env=env)
    assert f"{persistent} (RLHF_PREFER_DATA_DIR) exists but cannot be written" in done.stderr
    assert str(tmp_path / "home") in done.stderr


def test_the_image_makes_every_folder_compose_mounts_a_volume_on_for_its_user():
    # Review of s26: docker-compose.yml mounted named volumes on /artifacts and the
    # adapters folder, which the image never made: Docker creates them root-owned, and
    # the app (uid 1000) could not write a large adapter there. Read, not run: no Docker
    # engine here.
    import yaml

    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    ours = [s for s in compose["services"].values() if "build" in s]
    targets = {m.split(":")[1] for s in ours for m in s.get("volumes", [])}
    assert targets, "no volume of ours in docker-compose.yml"
    dockerfile = (ROOT / "Dockerfile").read_text()
    made = re.search(r"mkdir -p ([^\n&]+)", dockerfile)
    owned = re.search(r"chown user:user ([^\n]+)", dockerfile)
    assert made and owned, "the Dockerfile makes no mount points"
    for target in targets:
        assert target in made.group(1).split() and target in owned.group(1).split(), target
    assert dockerfile.index("chown user:user") < dockerfile.index("USER user")


def test_container_command_serves_finds_data_and_stops_cleanly(tmp_path, up_env):
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert 'CMD ["rlhf-chat", "up"]' in dockerfile
    assert "RLHF_PREFER_DATA_DIR=/data" in dockerfile and "RLHF_HOST=0.0.0.0" in dockerfile
    assert "USER user" in dockerfile and "--uid 1000" in dockerfile

    mount = tmp_path / "mount"  # stands for the Space's persistent /data
    mount.mkdir()
    # As the Dockerfile sets it: the mount preferred, the data dir only a fallback.
    env = dict(up_env, RLHF_HOST="0.0.0.0", RLHF_DATA_DIR=str(tmp_path / "fallback"),
               RLHF_PREFER_DATA_DIR=str(mount))  # fmt: skip
    port = env["RLHF_PORT"]
    log = tmp_path / "up.log"
    up = start_up(env, log)
    try:
        data_dir = mount / "rlhf-chat"
        assert (data_dir / URL_FILE).exists(), "the embedded server belongs in the mounted /data"
        assert not (tmp_path / "fallback").exists()
        children = children_of(up.pid)
        assert len(children) >= 2, "expected the Valkey server and the worker as children"

        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        chat, answers, *_ = client.predict(
            "Hello from the container", "", 1.0, 0.9, 6, api_name="/send"
        )
        assert answers[0]["turn_id"]
        info = json.loads(rlhf_chat("status", "--json", env=env).stdout)
        assert info["turns"] == 1
    finally:
        up.send_signal(signal.SIGTERM)
        code = up.wait(timeout=60)
    assert code == 0, log.read_text()[-3000:]
    assert "Shutting down" in log.read_text()
    assert not any(alive(pid) for pid in children), "children outlived `rlhf-chat up`"
    assert not (data_dir / URL_FILE).exists()
    # The data survived the stop: a fresh server on the same folder replays the AOF.
    with EmbeddedValkey(data_dir) as again:
        assert FeedbackStore(redis.Redis.from_url(again.url)).counts()["turns"] == 1


def test_worker_passes_celery_options_through(tmp_path):
    """`rlhf-chat worker --queues train --help` reaches celery's own option parser."""
    env = {**os.environ, "RLHF_REDIS_URL": "redis://127.0.0.1:1/0", "RLHF_DATA_DIR": str(tmp_path)}
    cli = Path(sys.executable).with_name("rlhf-chat")
    done = subprocess.run(
        [str(cli), "worker", "--queues", "train", "--help"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "--queues" in done.stdout and "unrecognized" not in done.stderr
