"""``python -m worker``: a Celery worker for training rounds.

Extra arguments go to ``celery worker`` (e.g. ``--queues train`` on a GPU box).

Pool: prefork with one child. Soft time limits need a pool that can interrupt
the task (solo cannot); one child because a round holds the base model and one
round runs at a time anyway. The parent process never touches torch (tasks
import it lazily), so forking the child is safe.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

from rlhf_core.redis_server import discover_url
from rlhf_core.settings import SettingsError, get_settings


def worker_argv(extra: list[str]) -> list[str]:
    # Imported here, not above: importing the Celery app reads the settings, and main()
    # must read them first to refuse a bad value with a message instead of a traceback.
    from worker.celery_app import DEFAULT_QUEUE, TRAIN_QUEUE

    argv = ["worker", "--loglevel", "INFO"]
    if not any(a.startswith(("-Q", "--queues")) for a in extra):
        argv += ["--queues", f"{TRAIN_QUEUE},{DEFAULT_QUEUE}"]
    if not any(a.startswith(("-P", "--pool")) for a in extra):
        argv += ["--pool", "prefork"]
    if not any(a.startswith(("-c", "--concurrency")) for a in extra):
        argv += ["--concurrency", "1"]
    # Gossip/mingle/heartbeat are chatter between workers that this project never uses.
    return argv + ["--without-gossip", "--without-mingle", "--without-heartbeat"] + extra


PARENT_PIPE_ENV = "RLHF_PARENT_PIPE_FD"


def watch_parent() -> None:
    """Under `rlhf-chat up`: the read end of a pipe whose write end only ``up`` holds.
    It reads EOF when ``up`` is gone, by any signal (kill -9 included: the kernel closes
    its files); then this worker takes its whole process group down, the pool child in
    the middle of a round too (the round re-runs later, see rlhf_core.upkeep), instead
    of living on as an orphan."""
    fd = os.environ.pop(PARENT_PIPE_ENV, None)
    if fd is None:
        return

    def wait() -> None:
        try:
            while os.read(int(fd), 1):
                pass
        except OSError:
            pass
        if os.getpgrp() == os.getpid():  # our own group (`up` starts us in a new session)
            os.killpg(os.getpgrp(), signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=wait, name="parent-watch", daemon=True).start()


def main(extra: list[str] | None = None) -> None:
    watch_parent()
    try:
        settings = get_settings()
    except SettingsError as error:
        sys.exit(f"rlhf-chat worker: {error}")
    if discover_url(settings) is None:
        sys.exit(
            "No Redis to connect to: set RLHF_REDIS_URL=redis://host:6379/0 (the URL the UI "
            "uses), or start the embedded server first with `rlhf-chat up` using the same "
            f"RLHF_DATA_DIR ({settings.data_dir})."
        )
    from worker.celery_app import app

    app.worker_main(worker_argv(list(sys.argv[1:] if extra is None else extra)))


if __name__ == "__main__":
    main()
