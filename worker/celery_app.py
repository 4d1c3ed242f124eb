"""The Celery app every worker runs and every client (UI, CLI) sends to.

Broker and result backend are the same Redis as everything else
(``RLHF_REDIS_URL``, or the embedded server that ``rlhf-chat up`` started and
wrote to ``<data_dir>/redis.url``), so a worker on another machine needs only
that URL (and the shared artifact folder for large adapters).

Training goes to its own queue, ``train``, so GPU machines can listen to it
alone (``rlhf-chat worker --queues train``). A round is long and idempotent
(the lock and the consumer group make a repeated round harmless), hence
``acks_late`` with one message prefetched, and a broker visibility timeout
longer than the longest round so Redis does not hand a running round to a
second worker.
"""

from __future__ import annotations

from celery import Celery

from rlhf_core.redis_server import discover_url
from rlhf_core.settings import Settings, get_settings

TRAIN_QUEUE = "train"
DEFAULT_QUEUE = "default"
TRAIN_TASK = "rlhf.train_round"
PING_TASK = "rlhf.ping"


def celery_config(settings: Settings, url: str | None) -> dict:
    # Redis hands an unacked message to another worker after this long; a round
    # that is still running must never be re-delivered, so leave a wide margin.
    visibility = int(settings.round_time_limit_s * 2 + 600)
    return {
        "broker_url": url,
        "result_backend": url,
        "broker_transport_options": {"visibility_timeout": visibility},
        "result_backend_transport_options": {"visibility_timeout": visibility},
        "broker_connection_retry_on_startup": True,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_expires": 24 * 3600,
        "task_default_queue": DEFAULT_QUEUE,
        "task_routes": {TRAIN_TASK: {"queue": TRAIN_QUEUE}},
        "task_acks_late": True,
        # A round killed with its worker (OOM, kill -9 of a pool child) goes back to
        # the queue; the next worker reclaims the round's pending feedback.
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_track_started": True,
        "worker_hijack_root_logger": False,
        "worker_send_task_events": False,
    }


def make_app(settings: Settings | None = None, url: str | None = None) -> Celery:
    settings = settings or get_settings()
    app = Celery("rlhf_chat", include=["worker.tasks"])
    app.conf.update(celery_config(settings, url or discover_url(settings)))
    return app


app = make_app()
