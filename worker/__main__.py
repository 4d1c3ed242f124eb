"""``python -m worker``: a Celery worker for training rounds.

Extra arguments go to ``celery worker`` (e.g. ``--queues train`` on a GPU box).

Pool: prefork with one child. Soft time limits need a pool that can interrupt
the task (solo cannot); one child because a round holds the base model and one
round runs at a time anyway. The parent process never touches torch (tasks
import it lazily), so forking the child is safe.
"""

from __future__ import annotations

import sys

from rlhf_core.redis_server import discover_url
from rlhf_core.settings import get_settings
from worker.celery_app import DEFAULT_QUEUE, TRAIN_QUEUE


def worker_argv(extra: list[str]) -> list[str]:
    argv = ["worker", "--loglevel", "INFO"]
    if not any(a.startswith(("-Q", "--queues")) for a in extra):
        argv += ["--queues", f"{TRAIN_QUEUE},{DEFAULT_QUEUE}"]
    if not any(a.startswith(("-P", "--pool")) for a in extra):
        argv += ["--pool", "prefork"]
    if not any(a.startswith(("-c", "--concurrency")) for a in extra):
        argv += ["--concurrency", "1"]
    # Gossip/mingle/heartbeat are chatter between workers that this project never uses.
    return argv + ["--without-gossip", "--without-mingle", "--without-heartbeat"] + extra


def main(extra: list[str] | None = None) -> None:
    settings = get_settings()
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
