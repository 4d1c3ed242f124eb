"""Hot swap under load: N concurrent streaming chats while versions are published.

The real pieces: an embedded Valkey server, the chat UI served by Gradio (with its
VersionWatcher), ``gradio_client`` streaming chats, and the registry's atomic publish.
The default model (SmolLM2-135M-Instruct) on the CPU.

The chats run without a break (each sends a message in a new chat, streams the answer,
sends the next; they start ``--stagger`` s apart) through three time windows of the same
length: on the bare base model (version 0, no adapter); then one version (a LoRA adapter
with random weights, saved the PEFT way) is published and served with no further
publishes (the baseline); then a new version is published every ``--interval`` seconds.
An answer belongs to the window it started in. Measured:

- ``swap_visible_p50_s`` / ``_p95_s``: from a publish to the first streamed update of an
  answer served by that version (target p95 <= 2 s). With the batched server (the
  default) a new answer joins the running batch at the next step; with
  RLHF_SERVING_BACKEND=sequential this includes the wait behind the answers queued;
- ``swap_ready_p50_s`` / ``_p95_s``: from a publish to the moment the UI hands the new
  version to new requests (VersionWatcher: pub/sub, unpack, load beside the old one);
- ``failed_requests``: chats that raised (target 0);
- ``latency_p95_ratio``: p95 answer time during swaps / without (target <= 1.2), "without"
  being the baseline phase: the service serving a version, no publishes;
- ``latency_p95_ratio_vs_base_model``: the same over the bare-base-model phase.

Two changes of method in the hot-swap work of issue 12 (the targets are defined as before):

- The chats run through all windows. Before, each phase stopped the chats and started all
  of them again at once, so every phase began with 8 messages in the same instant and the
  answers, all of one length, kept ending and restarting in bunches; a version published
  just after a bunch waited for the next one (profiled: 2.9 s of the worst visible time,
  3.9 s; on the batched server a new answer joins at the next step). Independent people do not send
  in lockstep; the chats now start 0.6 s apart and are never restarted.
- The baseline serves an adapter (before, it was the bare-model phase): the ratio is meant
  to say what swapping costs the people chatting, and a service has a version current
  after its first round. Against the bare model the ratio also holds the cost of running
  any LoRA adapter at all (its products in every layer of every step, 12-17% of a
  decode step at 8 chats here), which no swap mechanism removes; the JSON keeps that
  ratio too (``latency_p95_ratio_vs_base_model``), so both can be read.

A third, of 2026-12-05: the chats run in a process of their own (``--clients process``, the
default), as people's browsers are not in the server's process; as threads of the server's
process (``--clients thread``, the method before) they took its interpreter lock from the decode
loop (answers 12% slower, results/hot_swap_clients/).

    python benchmarks/hot_swap.py [--chats 8] [--duration 40] [--interval 4] [--stagger 0.6]
                                   [--clients process|thread] [--out FILE]

(RLHF_MODEL_CACHE_DIR names the model cache; the JSON keeps the command line.)
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from rlhf_core.modeling import lora_config  # noqa: E402
from rlhf_core.redis_server import EmbeddedValkey, connect, free_port  # noqa: E402
from rlhf_core.registry import Registry  # noqa: E402
from rlhf_core.settings import Settings  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "hot_swap.json"
QUESTIONS = [
    "What is the capital of France?",
    "Give me a tip for learning Python.",
    "Why is the sky blue?",
    "Name three fruits.",
    "How do I boil an egg?",
    "What is a prime number?",
    "Say something kind.",
    "What does a CPU do?",
]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def make_adapters(settings: Settings, out: Path, count: int) -> list[Path]:
    """``count`` distinct LoRA adapters for the base model, small random B so answers
    stay sensible (the benchmark measures swapping, not quality)."""
    from peft import get_peft_model

    from rlhf_core.modeling import load_base_model

    base = load_base_model(settings, device=torch.device("cpu"))
    model = get_peft_model(copy.deepcopy(base.model), lora_config(settings))
    folders = []
    for i in range(count):
        torch.manual_seed(i)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 1e-3)
        folder = out / f"adapter{i}"
        model.save_pretrained(folder)
        folders.append(folder)
    return folders


class Chats:
    """``n`` chat clients in a loop, each on its own gradio_client session."""

    def __init__(self, url: str, n: int, max_new_tokens: int) -> None:
        from gradio_client import Client

        self.clients = [Client(url, verbose=False) for _ in range(n)]
        self.max_new_tokens = max_new_tokens
        self.records: list[dict] = []  # one per answer
        self.first_seen: dict[int, float] = {}  # version -> first streamed update time
        self.lock = threading.Lock()
        self.stop = threading.Event()

    def _loop(self, i: int) -> None:
        client = self.clients[i]
        k = 0
        while not self.stop.is_set():
            question = QUESTIONS[(i + k) % len(QUESTIONS)]
            k += 1
            start = time.time()
            record = {"start": start, "ok": False, "version": None, "question": question,
                      "updates": 0}  # fmt: skip
            try:
                job = client.submit(question, "Be brief.", 0.7, 0.9, self.max_new_tokens,
                                    api_name="/send")  # fmt: skip
                for update in job:
                    answers = update[1]
                    if answers:
                        version = answers[-1]["version"]
                        now = time.time()
                        with self.lock:
                            self.first_seen.setdefault(version, now)
                        record["version"] = version
                        record.setdefault("first", now)  # first streamed update
                        record["last"] = now
                        record["updates"] += 1  # streamed updates this answer took
                job.result()
                record["ok"] = True
            except Exception as error:  # counted: the target is zero
                record["error"] = f"{type(error).__name__}: {error}"
            record["end"] = time.time()
            with self.lock:
                self.records.append(record)
            # A new chat each time keeps prompts short and comparable between phases.
            try:
                client.predict(api_name="/new_chat")
            except Exception:
                pass

    def start(self, stagger_s: float) -> None:
        """Start the chats, one every ``stagger_s`` seconds; they run until :meth:`stop`."""
        self.stop.clear()
        self.threads = []
        for i in range(len(self.clients)):
            if i:
                time.sleep(stagger_s)
            thread = threading.Thread(target=self._loop, args=(i,))
            thread.start()
            self.threads.append(thread)

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=300)

    def close(self) -> None:
        """After an error: the chats stop after their answer in progress."""
        self.stop.set()

    def between(self, start: float, end: float, ended_by: float | None = None) -> list[dict]:
        """Answers that started in [start, end) (and, given ``ended_by``, ended before it)."""
        with self.lock:
            return [
                r for r in self.records
                if start <= r["start"] < end and (ended_by is None or r["end"] < ended_by)
            ]  # fmt: skip


def _chats_in_a_process(url, n, max_new_tokens, stagger_s, started, stop, out) -> None:
    """:class:`ChatsProcess`'s child: the chats, their records sent back when stopped
    (or the error that stopped them)."""
    import traceback

    try:
        chats = Chats(url, n, max_new_tokens)
        chats.start(stagger_s)
        started.set()
        stop.wait()
        chats.finish()
        out.put({"records": chats.records, "first_seen": chats.first_seen})
    except BaseException:
        out.put({"error": traceback.format_exc()})


class ChatsProcess:
    """The same chats (:class:`Chats`) in a process of their own, as people's browsers are
    not in the server's process: in one process the eight clients' threads (streaming
    reads, JSON, the SSE parser) take the interpreter lock from the server's decode loop
    and its Gradio event loop. The records come back when the chats stop; times are
    ``time.time()`` of the same machine, so they compare with the publishes'."""

    def __init__(self, url: str, n: int, max_new_tokens: int) -> None:
        import multiprocessing

        self._ctx = multiprocessing.get_context("spawn")  # no forked copy of the model
        self._args = (url, n, max_new_tokens)
        self._started, self._stop = self._ctx.Event(), self._ctx.Event()
        self._out = self._ctx.Queue()
        self.records: list[dict] = []
        self.first_seen: dict[int, float] = {}
        self.lock = threading.Lock()

    def start(self, stagger_s: float) -> None:
        """Start the chats and return once the last one has sent its first message."""
        self.process = self._ctx.Process(
            target=_chats_in_a_process,
            args=(*self._args, stagger_s, self._started, self._stop, self._out),
            daemon=True,
        )
        self.process.start()
        deadline = time.time() + 300
        while not self._started.wait(timeout=1.0):
            if self.process.exitcode is not None or time.time() > deadline:
                self.close()
                raise RuntimeError(f"the chat clients' process did not start: {self._error()}")

    def finish(self) -> None:
        import queue

        self._stop.set()
        deadline = time.time() + 600
        while True:
            try:
                got = self._out.get(timeout=1.0)
                break
            except queue.Empty:
                if not self.process.is_alive() or time.time() > deadline:
                    self.close()
                    raise RuntimeError(
                        "the chat clients' process ended without its records"
                    ) from None
        self.process.join(timeout=60)
        if "error" in got:
            raise RuntimeError(f"the chat clients' process failed:\n{got['error']}")
        self.records, self.first_seen = got["records"], got["first_seen"]

    def _error(self) -> str:
        try:
            return self._out.get(timeout=1.0).get("error", "no error reported")
        except Exception:
            return f"exit code {self.process.exitcode}"

    def close(self) -> None:
        """Stop the clients' process whatever state it is in (after an error)."""
        self._stop.set()
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(timeout=10)

    between = Chats.between


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--chats", type=int, default=8)
    parser.add_argument("--duration", type=float, default=40.0, help="seconds per phase")
    parser.add_argument("--interval", type=float, default=4.0, help="seconds between publishes")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument(
        "--stagger", type=float, default=0.6, help="seconds between the chats' first messages"
    )
    parser.add_argument(
        "--clients", choices=("process", "thread"), default="process",
        help="the chat clients in a process of their own (as browsers are), or as threads of "
        "the server's process (the method before; they share its interpreter lock)",
    )  # fmt: skip
    parser.add_argument("--base-model", default=None, help="default: SmolLM2-135M-Instruct")
    parser.add_argument("--out", type=Path, default=RESULTS)
    return parser.parse_args(argv)


def measure(args: argparse.Namespace) -> tuple[dict, dict]:
    """Run the three phases; returns (the JSON result, the raw records for profiling:
    ``records``, ``published`` {version: time}, ``phases`` {name: (start, end)})."""
    tmp = Path(tempfile.mkdtemp(prefix="hot-swap-"))
    server = EmbeddedValkey(tmp / "valkey", fsync="everysec").start()
    app = chats = None
    try:
        settings = Settings(
            data_dir=tmp / "data",
            model_cache_dir=Path(os.environ.get("RLHF_MODEL_CACHE_DIR",
                                                Path.home() / ".cache/rlhf-chat")),
            redis_url=server.url,
            port=free_port(),
            device="cpu",
            max_new_tokens=args.max_new_tokens,
            version_poll_s=1.0,
            train_every=10**9,  # no training rounds: publishes come from this script
            **({"base_model": args.base_model} if args.base_model else {}),
        )  # fmt: skip
        # One version served before the swaps, then one per interval.
        n_versions = int(args.duration // args.interval) + 2
        print(f"preparing {n_versions} adapters…", flush=True)
        adapters = make_adapters(settings, tmp, n_versions)

        from chat_ui.app import serve

        app = serve(settings, block=False)
        chats_class = ChatsProcess if args.clients == "process" else Chats
        chats = chats_class(app.url, args.chats, args.max_new_tokens)
        phases: dict[str, tuple[float, float]] = {}
        # The chats run without a break through all phases; a phase is a time window.
        chats.start(args.stagger)
        time.sleep(5.0)  # warm-up: first requests compile kernels, fill caches
        print(f"base model: {args.chats} chats for {args.duration:.0f} s", flush=True)
        phases["base_model"] = (time.time(), time.time() + args.duration)
        time.sleep(args.duration)

        registry = Registry(connect(settings), settings)
        lock = registry.lock()
        token = lock.acquire()
        first_at = time.time()
        first = registry.publish(adapters[0], {"benchmark": True}, token)
        deadline = time.time() + 60
        while app.service.policy.current_version != first and time.time() < deadline:
            time.sleep(0.05)
        assert app.service.policy.current_version == first, "the first version never arrived"
        print(f"baseline (v{first}, no swaps): {args.chats} chats", flush=True)
        phases["baseline"] = (time.time(), time.time() + args.duration)
        time.sleep(args.duration)
        published: dict[int, float] = {}

        print(f"swaps: publishing every {args.interval:.0f} s", flush=True)
        phases["swapping"] = (time.time(), time.time() + args.duration)
        i = 1
        while time.time() < phases["swapping"][1] and i < len(adapters):
            at = time.time()
            published[registry.publish(adapters[i], {"benchmark": True}, token)] = at
            i += 1
            time.sleep(max(0.0, min(args.interval - (time.time() - at),
                                    phases["swapping"][1] - time.time())))  # fmt: skip
        time.sleep(max(0.0, phases["swapping"][1] - time.time()))
        chats.finish()
        lock.release()
        # An answer belongs to the phase it started in; one still running when the next
        # phase began (a publish) is left out of the two phases without swaps.
        on_base = chats.between(*phases["base_model"], ended_by=first_at)
        baseline = chats.between(*phases["baseline"], ended_by=phases["swapping"][0])
        swapping = chats.between(*phases["swapping"])
        measured = chats.between(phases["base_model"][0], float("inf"))

        visible = [chats.first_seen[v] - at for v, at in published.items() if v in chats.first_seen]
        # When the UI started giving new requests the version (the watcher's swap), as
        # opposed to when the first such answer began streaming (after the queue ahead).
        swapped = dict(app.watcher.swaps) if app.watcher else {}
        ready = [swapped[v] - at for v, at in published.items() if v in swapped]
        missed = [v for v in published if v not in chats.first_seen]
        # Where each version's visible time went: the UI's swap (ready), then the wait for
        # some chat to send a message after it (negative: sent just before the swap and
        # given the new version as its request was handled), then that answer's first
        # streamed update.
        parts = []
        for v, at in published.items():
            on_v = [r for r in chats.records if r["version"] == v and "first" in r]
            if on_v and v in swapped:
                first = min(on_v, key=lambda r: r["first"])
                parts.append({
                    "version": v, "visible_s": round(first["first"] - at, 3),
                    "ready_s": round(swapped[v] - at, 3),
                    "send_after_ready_s": round(first["start"] - swapped[v], 3),
                    "first_update_s": round(first["first"] - first["start"], 3),
                })  # fmt: skip
        parts.sort(key=lambda p: -p["visible_s"])
        lat_model = [r["end"] - r["start"] for r in on_base if r["ok"]]
        lat_base = [r["end"] - r["start"] for r in baseline if r["ok"]]
        lat_swap = [r["end"] - r["start"] for r in swapping if r["ok"]]
        failed = [r for r in measured if not r["ok"]]
        for phase, times in (("base model", lat_model), ("baseline", lat_base),
                             ("swapping", lat_swap)):  # fmt: skip
            if not times:
                raise SystemExit(
                    f"No answer finished within the {phase} phase: give --duration several "
                    "times one answer's length (about 6 s at 8 chats on 2 CPU cores)."
                )
        result = {
            "swap_visible_p50_s": round(statistics.median(visible), 3) if visible else None,
            "swap_visible_p95_s": round(percentile(visible, 95), 3) if visible else None,
            "swap_visible_max_s": round(max(visible), 3) if visible else None,
            "swap_ready_p50_s": round(statistics.median(ready), 3) if ready else None,
            "swap_ready_p95_s": round(percentile(ready, 95), 3) if ready else None,
            "failed_requests": len(failed),
            "latency_p95_ratio": round(percentile(lat_swap, 95) / percentile(lat_base, 95), 3),
            "latency_p95_baseline_s": round(percentile(lat_base, 95), 3),
            "latency_p95_swapping_s": round(percentile(lat_swap, 95), 3),
            "latency_p50_baseline_s": round(statistics.median(lat_base), 3),
            "latency_p50_swapping_s": round(statistics.median(lat_swap), 3),
            "latency_p95_ratio_vs_base_model": round(
                percentile(lat_swap, 95) / percentile(lat_model, 95), 3
            ),
            "latency_p95_base_model_s": round(percentile(lat_model, 95), 3),
            "latency_p50_base_model_s": round(percentile(lat_model, 50), 3),
            # One per streamed chunk while the UI keeps up with the decode loop (about one
            # per token); far fewer would say it falls behind.
            "updates_per_answer_p50": statistics.median(
                [r["updates"] for r in baseline if r["ok"]]
            ),
            "answers_base_model": len(on_base),
            "answers_baseline": len(baseline),
            "answers_swapping": len(swapping),
            "versions_published": len(published),
            "command": "python benchmarks/hot_swap.py " + " ".join(sys.argv[1:]),
            "versions_never_seen": missed,
            "send_after_ready_p50_s": round(
                statistics.median([p["send_after_ready_s"] for p in parts]), 3
            ) if parts else None,
            "first_update_p50_s": round(
                statistics.median([p["first_update_s"] for p in parts]), 3
            ) if parts else None,
            "visible_parts_slowest_first": parts,
            "errors": sorted({r.get("error", "") for r in failed})[:5],
            "config": {
                "serving_backend": settings.serving_backend,
                "chats": args.chats, "duration_s": args.duration, "interval_s": args.interval,
                "stagger_s": args.stagger, "clients": args.clients,
                "max_new_tokens": args.max_new_tokens, "base_model": settings.base_model,
                "device": "cpu", "cpus": os.cpu_count(), "machine": platform.machine(),
                "torch": torch.__version__,
            },
        }  # fmt: skip
        raw = {"records": list(chats.records), "published": published, "phases": phases}
        return result, raw
    finally:
        if chats is not None:
            chats.close()  # after an error before finish(): no client left sending
        if app is not None:
            app.close()
        server.stop()


def main() -> None:
    args = parse_args()
    result, _ = measure(args)
    print(json.dumps(result, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
