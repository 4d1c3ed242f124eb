"""``rlhf-chat``: run the service and look at its data.

    rlhf-chat up        embedded Valkey (unless RLHF_REDIS_URL) + a Celery worker + the UI
    rlhf-chat ui        the UI alone, against the Redis that is already running
    rlhf-chat worker    the Celery worker alone (arguments go to ``celery worker``)
    rlhf-chat status    turns, events, events not yet trained on, current policy version
    rlhf-chat export --format {turns,kto,dpo,reward,arena} --out FILE.jsonl
    rlhf-chat forget --user ID   delete one person's data (turns, events) everywhere
    rlhf-chat retention          delete what is older than RLHF_RETENTION_DAYS now

Every command reads the same ``RLHF_*`` settings; with the embedded server, a
command finds it through ``<data_dir>/redis.url``, so ``status`` run beside ``up``
sees the same data. ``--prefer-data-dir DIR`` (or ``RLHF_PREFER_DATA_DIR``) puts
the data in ``DIR/rlhf-chat`` when DIR exists and is writable: a Hugging Face
Space's persistent ``/data`` when it is mounted, RLHF_DATA_DIR otherwise.

More commands: append a ``(name, help, add_arguments, run)`` tuple to COMMANDS.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rlhf_core.settings import Settings, get_settings

WORKER_STOP_S = 15.0  # a worker mid-round gets this long to stop before it is killed
# `up` stops within this (Docker sends SIGKILL 10 s after SIGTERM); a worker still in a
# round after most of it is killed, its round re-runs later.
STOP_S = 8.0


# --- settings ------------------------------------------------------------------------
def settings_from(args: argparse.Namespace) -> Settings:
    """The process settings plus what the command line overrides."""
    settings = get_settings()
    update: dict[str, Any] = {}
    prefer = getattr(args, "prefer_data_dir", None)
    if prefer and os.path.isdir(prefer) and os.access(prefer, os.W_OK):
        update["data_dir"] = Path(prefer) / "rlhf-chat"
    elif prefer and os.path.exists(prefer):
        # Persistent storage is there but not ours to write: the data goes to a folder that
        # may not outlive the container. Absent (no storage) is the expected case; this is not.
        print(
            f"warning: {prefer} (RLHF_PREFER_DATA_DIR) exists but cannot be written by this "
            f"user; data goes to {settings.data_dir} instead, which may not outlive this "
            "container.",
            file=sys.stderr,
            flush=True,
        )
    for name in ("host", "port"):
        if getattr(args, name, None) is not None:
            update[name] = getattr(args, name)
    # Validated as the environment's values are (model_copy would take --port 0 as it is).
    return type(settings)(**{**settings.model_dump(), **update}) if update else settings


def child_env(settings: Settings, redis_url: str) -> dict[str, str]:
    """Environment for child processes: the same settings, and the Redis URL spelled out."""
    env = dict(os.environ)
    env["RLHF_DATA_DIR"] = str(settings.data_dir)
    env["RLHF_REDIS_URL"] = redis_url
    return env


# --- up / ui / worker ------------------------------------------------------------------
def worker_available() -> bool:
    return importlib.util.find_spec("worker.__main__") is not None


class Child:
    """A worker process owned by ``up``: in its own process group (a Ctrl-C in the
    terminal reaches it only through us, and we stop it together with its pool), and
    holding the read end of a pipe whose write end only we hold, so it takes itself down
    when we die by any signal (see worker.__main__.watch_parent)."""

    def __init__(self, env: dict[str, str]) -> None:
        read_end, self._write_end = os.pipe()
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "worker"],
                env={**env, "RLHF_PARENT_PIPE_FD": str(read_end)},
                pass_fds=(read_end,),
                start_new_session=True,
            )
        finally:
            os.close(read_end)
        self.started = time.monotonic()

    def poll(self) -> int | None:
        return self.process.poll()

    @property
    def returncode(self) -> int | None:
        return self.process.returncode

    def terminate(self) -> None:
        """Ask for a warm shutdown (Celery stops taking tasks; the pool ends)."""
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def wait_or_kill(self, timeout: float) -> None:
        try:
            self.process.wait(timeout=max(0.0, timeout))
        except subprocess.TimeoutExpired:
            # A round in the middle: it is crash-safe and re-runs later (rlhf_core.upkeep).
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.process.wait()
        finally:
            try:
                os.close(self._write_end)
            except OSError:
                pass


def start_worker(env: dict[str, str]) -> Child | None:
    if not worker_available():
        print("note: no worker package here (worker/__main__.py); training rounds will not run.")
        return None
    return Child(env)


def stop_process(process: Any, timeout: float = WORKER_STOP_S) -> None:
    if process is None or process.poll() is not None:
        return
    process.terminate()
    if isinstance(process, Child):
        process.wait_or_kill(timeout)
        return
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _exit_on_sigterm() -> None:
    # SIGTERM (docker stop, a supervisor) takes the same clean path as Ctrl-C.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))


def _restart_delay(restarts: int) -> float:
    """Seconds before the next restart of a child that keeps dying (1, 2, 4 ... 60)."""
    return min(60.0, 2.0 ** max(0, restarts - 1))


def ensure_writable(data_dir: Path) -> None:
    """`up` keeps Valkey's append-only files, its password and adapters in the data folder:
    one it cannot write (a read-only mount, a volume owned by another user) ends the start
    with what to do, before anything is started."""
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        probe = data_dir / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        sys.exit(
            f"rlhf-chat up: cannot write the data folder {data_dir} ({error.strerror}). Set "
            "RLHF_DATA_DIR to a folder this user can write, or make that one writable."
        )


def cmd_up(args: argparse.Namespace) -> int:
    """Valkey (unless RLHF_REDIS_URL), a worker and the UI, owned by this process: they
    die with it, by any signal (Valkey by PR_SET_PDEATHSIG, the worker by a pipe); a
    child that dies is started again on the same files (Valkey on the same port, so
    every client reconnects by itself); a stop (SIGTERM, Ctrl-C) ends within STOP_S."""
    from chat_ui.app import serve
    from rlhf_core.redis_server import redact, start_embedded_if_needed

    settings = settings_from(args)
    ensure_writable(Path(settings.data_dir))
    _exit_on_sigterm()
    url, embedded = start_embedded_if_needed(settings, die_with_parent=True)
    if embedded is not None:
        print(
            f"Embedded Valkey on {redact(url)} (append-only files in {embedded.data_dir})",
            flush=True,
        )
    else:
        print(f"Using Redis at {redact(url)}", flush=True)
    settings = settings.model_copy(update={"redis_url": url})
    worker = app = None
    restarts = {"worker": 0, "valkey": 0}
    next_try = {"worker": 0.0, "valkey": 0.0}
    try:
        worker = None if args.no_worker else start_worker(child_env(settings, url))
        app = serve(settings, block=False)
        while True:
            time.sleep(0.5)
            now = time.monotonic()
            if embedded is not None and embedded.process.poll() is not None:
                if now >= next_try["valkey"]:
                    restarts["valkey"] += 1
                    print(f"embedded Valkey {embedded.exit_reason()}; starting it again on "
                          "the same files", file=sys.stderr, flush=True)  # fmt: skip
                    try:
                        embedded.start()
                        embedded.write_url_file()
                    except Exception as error:  # tried again after a pause
                        print(f"could not restart Valkey: {error}", file=sys.stderr, flush=True)
                    next_try["valkey"] = now + _restart_delay(restarts["valkey"])
            if worker is not None and worker.poll() is not None and now >= next_try["worker"]:
                if now - worker.started > 300:
                    restarts["worker"] = 0  # it ran a good while: not a crash loop
                restarts["worker"] += 1
                print(f"worker exited with code {worker.returncode}; starting it again",
                      file=sys.stderr, flush=True)  # fmt: skip
                stop_process(worker)  # closes our end of its pipe
                worker = start_worker(child_env(settings, url))
                next_try["worker"] = now + _restart_delay(restarts["worker"])
    except (KeyboardInterrupt, SystemExit):  # Ctrl-C, or SIGTERM (see _exit_on_sigterm)
        pass
    finally:
        print("Shutting down…", flush=True)
        started = time.monotonic()
        # Everything is told first, then waited for: the stops overlap instead of adding up.
        if worker is not None:
            worker.terminate()
        if app is not None:
            app.close()
        if worker is not None:
            worker.wait_or_kill(STOP_S - 2.0 - (time.monotonic() - started))
        if embedded is not None:
            embedded.stop()
        print(f"Stopped in {time.monotonic() - started:.1f} s", flush=True)
    # Everything that holds data is stopped and flushed. The interpreter's own teardown
    # after serving a model then spends seconds in C (no Python frame left: torch's
    # thread pools), which with the stop above went past Docker's 10 s; skip it.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def cmd_ui(args: argparse.Namespace) -> int:
    from chat_ui.app import serve

    _exit_on_sigterm()
    try:
        serve(settings_from(args), block=True)
    except KeyboardInterrupt:
        pass
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    env = dict(os.environ, RLHF_DATA_DIR=str(settings.data_dir))
    argv = [sys.executable, "-m", "worker", *args.celery_args]
    os.execve(sys.executable, argv, env)  # the worker replaces this process
    return 0  # not reached


# --- status / export ---------------------------------------------------------------------
def _store(settings: Settings):
    from rlhf_core.feedback import FeedbackStore
    from rlhf_core.redis_server import connect

    return FeedbackStore(connect(settings))


def current_version(settings: Settings, client: Any) -> int:
    from rlhf_core.registry import Registry

    return Registry(client, settings).current()


def _training_line(settings: Settings, client: Any) -> str:
    from rlhf_core.registry import Registry

    # For the operator: a failed round's exception text included.
    return Registry(client, settings).status_line(public=False)


def cmd_status(args: argparse.Namespace) -> int:
    from rlhf_core.redis_server import durability_warnings

    settings = settings_from(args)
    store = _store(settings)
    counts = store.counts()
    info = {
        **counts,
        "durability_warnings": durability_warnings(store.redis),
        "current_version": current_version(settings, store.redis),
        "training": _training_line(settings, store.redis),
        "redis": store.redis.connection_pool.connection_kwargs.get("host", "?")
        + ":"
        + str(store.redis.connection_pool.connection_kwargs.get("port", "?")),
    }
    if args.json:
        print(json.dumps(info))
    else:
        print(f"turns:                  {info['turns']}")
        print(f"events:                 {info['events']}")
        print(f"events not trained on:  {info['unconsumed']}")
        print(f"current policy version: {info['current_version']}")
        print(f"training:               {info['training']}")
        print(f"redis:                  {info['redis']}")
        for warning in info["durability_warnings"]:
            print(f"warning: {warning}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from rlhf_core.datasets import export

    settings = settings_from(args)
    n = export(_store(settings), args.format, args.out, settings=settings)
    print(f"wrote {n} {args.format} rows to {args.out}")
    return 0


def cmd_forget(args: argparse.Namespace) -> int:
    """An admin deletes one person's data (a request by mail, say): their turns and
    events leave the store and every later round and export."""
    from rlhf_core.privacy import forget_user

    settings = settings_from(args)
    user = args.user.strip()
    if not user:
        print("rlhf-chat forget: --user needs the user id (as in a turns export).", file=sys.stderr)
        return 2
    counts = forget_user(_store(settings).redis, settings, user)
    if args.json:
        print(json.dumps(counts))
    else:
        print(f"deleted {counts['turns']} turns and {counts['events']} events of user {user!r}")
    return 0


def cmd_retention(args: argparse.Namespace) -> int:
    """Apply RLHF_RETENTION_DAYS (or --days) now; rounds also apply it when they start."""
    from rlhf_core.privacy import apply_retention

    settings = settings_from(args)
    days = args.days if args.days is not None else settings.retention_days
    if days is None:
        print("rlhf-chat retention: set RLHF_RETENTION_DAYS or pass --days.", file=sys.stderr)
        return 2
    counts = apply_retention(_store(settings).redis, settings, days=days)
    print(f"deleted {counts['turns']} turns and {counts['events']} events older than {days:g} days")
    return 0


# --- the parser ----------------------------------------------------------------------------
def _serve_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", help="address to listen on (RLHF_HOST)")
    parser.add_argument("--port", type=int, help="port of the UI (RLHF_PORT)")


def _up_args(parser: argparse.ArgumentParser) -> None:
    _serve_args(parser)
    parser.add_argument("--no-worker", action="store_true", help="do not start a worker")


def _worker_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("celery_args", nargs=argparse.REMAINDER, help="passed to celery worker")


def _status_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="one JSON object")


def _export_args(parser: argparse.ArgumentParser) -> None:
    from rlhf_core.datasets import EXPORT_FORMATS

    parser.add_argument("--format", required=True, choices=EXPORT_FORMATS)
    parser.add_argument("--out", required=True, help="JSONL file to write")


def _forget_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--user", required=True, help="the user id whose data to delete")
    parser.add_argument("--json", action="store_true", help="one JSON object")


def _retention_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--days", type=float, help="keep this many days (RLHF_RETENTION_DAYS)")


Command = tuple[str, str, Callable[[argparse.ArgumentParser], None], Callable[..., int]]
COMMANDS: list[Command] = [
    ("up", "embedded Redis + worker + chat UI (as `make run`)", _up_args, cmd_up),
    ("ui", "the chat UI alone, on the running Redis", _serve_args, cmd_ui),
    ("worker", "the Celery training worker", _worker_args, cmd_worker),
    ("status", "turns, events, untrained events, current version", _status_args, cmd_status),
    ("export", "write feedback as JSONL in TRL's formats", _export_args, cmd_export),
    ("forget", "delete one user's turns and events everywhere", _forget_args, cmd_forget),
    ("retention", "delete turns older than RLHF_RETENTION_DAYS", _retention_args, cmd_retention),
]
# train / versions / rollback live with the rest of the training UI code.
from chat_ui.training import CLI_COMMANDS  # noqa: E402

COMMANDS += CLI_COMMANDS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlhf-chat", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--prefer-data-dir",
        default=os.environ.get("RLHF_PREFER_DATA_DIR"),
        metavar="DIR",
        help="keep data in DIR/rlhf-chat when DIR exists and is writable (env "
        "RLHF_PREFER_DATA_DIR; a Space's /data), else in RLHF_DATA_DIR",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text, add_arguments, run in COMMANDS:
        # argparse %-formats help (not descriptions): a "95%" in a help text must be "%%".
        command = sub.add_parser(name, help=help_text.replace("%", "%%"), description=help_text)
        add_arguments(command)
        command.set_defaults(func=run)
    return parser


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["worker"]:
        # `rlhf-chat worker --queues train`: argparse's REMAINDER refuses a first argument
        # that looks like an option, so everything after "worker" goes to celery as it is.
        args = build_parser().parse_args(["worker"])
        args.celery_args = argv[1:]
    else:
        args = build_parser().parse_args(argv)
    try:
        code = args.func(args)
    except Exception as error:
        from rlhf_core.redis_server import RedisUnavailableError
        from rlhf_core.settings import SettingsError

        expected: tuple[type[BaseException], ...] = (RedisUnavailableError, SettingsError)
        # Only a command that loaded the model (or reached vLLM) can fail to; importing
        # either here costs torch.
        if "rlhf_core.modeling" in sys.modules:
            expected += (sys.modules["rlhf_core.modeling"].ModelLoadError,)
        if "rlhf_core.vllm_backend" in sys.modules:
            expected += (sys.modules["rlhf_core.vllm_backend"].VLLMUnavailableError,)
        if isinstance(error, expected):
            sys.exit(f"rlhf-chat {args.command}: {error}")
        raise
    sys.exit(code)


if __name__ == "__main__":
    main()
