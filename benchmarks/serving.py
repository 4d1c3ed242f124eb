#!/usr/bin/env python
"""Serving and ingestion benchmark: every figure is a ratio to a baseline measured
in the same run, on the same Valkey server and the same model.

1. Streamed generation through the app (``rlhf-chat ui`` in its own process,
   driven over HTTP by ``gradio_client``): time to first token and tokens/s,
   against a bare ``model.generate`` of the same model, prompt, greedy settings
   and length, in this process, the runs interleaved (the app idles while the
   bare run goes and the other way round).
2. Feedback ingestion: events/s through ``FeedbackStore.record_events`` in
   batches of 100 (turn and session check, then one atomic script: idempotency
   marker, XADD, per-turn index), against raw pipelined XADD of the same events
   in batches of 100 to the same server. Both sides start from ``Event`` objects
   and encode them with the same ``Event.to_json`` inside the timing (any writer
   has to). Also reported: one event per call from 8 threads, as the UI's 8
   reaction workers write single clicks.
3. The latency of one vote through the UI's HTTP API (``/vote``), p50 and p99: plain
   HTTP on Gradio's /call API, and through ``gradio_client`` (which adds its own
   50 ms polling loop).

4. Concurrency sweep (issue 12): 1, 4, 8, 16 chats streaming at once from the batched
   server (RLHF_SERVING_BACKEND=batched) and from the one-at-a-time server
   (``sequential``), the same model object, prompts and sampling, one level after the
   other in this process (``PolicyServer.stream`` as the chat handlers call it, no HTTP:
   this compares the engines). Per level: aggregate tokens/s (all tokens / wall time from
   the first request to the last answer), time to first visible text p50/p95, inter-token
   latency p50/p95 (gaps between a request's consecutive tokens, pooled), failed requests.
   ``batch_speedup_8`` = batched agg tokens/s over sequential at 8 chats;
   ``single_vs_bare`` = one batched chat's tokens/s over a bare ``model.generate`` of the
   same greedy answer, interleaved. With ``--vllm-url`` the same sweep also runs against
   that vLLM server (rlhf_core.vllm_backend).

    python benchmarks/serving.py --out benchmarks/results/serving.json
    python benchmarks/serving.py --sweep-only --new-tokens 48   # parts 4 only, merged
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see rlhf_core/__init__.py
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HERE = Path(__file__).resolve().parent
PROMPT = "Explain how a bicycle gear works."
SYSTEM = "You are a helpful assistant."


def log(*parts) -> None:
    print(time.strftime("%H:%M:%S"), *parts, file=sys.stderr, flush=True)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def start_app(settings_env: dict[str, str], port: int, data_dir: Path) -> subprocess.Popen:
    env = {**os.environ, **settings_env, "RLHF_PORT": str(port)}
    cli = Path(sys.executable).with_name("rlhf-chat")
    log_file = open(data_dir / "ui.log", "wb")  # noqa: SIM115
    process = subprocess.Popen([str(cli), "ui"], env=env, stdout=log_file, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"rlhf-chat ui exited; see {data_dir / 'ui.log'}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)
            return process
        except OSError:
            time.sleep(0.5)
    raise SystemExit("rlhf-chat ui did not start")


def app_stream(client, new_tokens: int) -> tuple[float, float, str]:
    """(ttft_s, total_s, answer) of one streamed answer through the HTTP API."""
    client.predict(api_name="/new_chat")
    start = time.perf_counter()
    job = client.submit(PROMPT, SYSTEM, 0.0, 1.0, new_tokens, api_name="/send")
    ttft = None
    for update in job:
        chat = update[0]
        if ttft is None and chat and chat[-1]["role"] == "assistant":
            content = chat[-1]["content"]
            text = content if isinstance(content, str) else json.dumps(content)
            if text.split("<sub>")[0].strip():
                ttft = time.perf_counter() - start
    total = time.perf_counter() - start
    chat = job.outputs()[-1][0]
    answer = chat[-1]["content"]
    answer = answer if isinstance(answer, str) else json.dumps(answer)
    return ttft or total, total, answer.split("\n\n<sub>")[0]


def bare_generate(loaded, new_tokens: int) -> tuple[float, float, int]:
    """(ttft_s, total_s, new tokens) of a bare model.generate, first token timed
    with a streamer that only records the time (no decoding work to speak of)."""
    import torch
    from transformers.generation.streamers import BaseStreamer

    class FirstToken(BaseStreamer):
        def __init__(self) -> None:
            self.calls = 0
            self.first: float | None = None

        def put(self, value) -> None:
            self.calls += 1
            if self.calls == 2 and self.first is None:  # call 1 is the prompt
                self.first = time.perf_counter()

        def end(self) -> None:
            pass

    tok = loaded.tokenizer
    enc = tok.apply_chat_template(
        [{"role": "system", "content": SYSTEM}, {"role": "user", "content": PROMPT}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    streamer = FirstToken()
    start = time.perf_counter()
    with torch.inference_mode():
        out = loaded.model.generate(
            **enc,
            max_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
            streamer=streamer,
        )
    total = time.perf_counter() - start
    return (
        (streamer.first or time.perf_counter()) - start,
        total,
        out.shape[1] - enc["input_ids"].shape[1],
    )


def bench_stream(args, loaded, url: str) -> dict:
    from gradio_client import Client

    client = Client(url, verbose=False)
    app_stream(client, args.new_tokens)  # warm-up both
    bare_generate(loaded, args.new_tokens)
    ours_tps, bare_tps, ours_ttft, bare_ttft = [], [], [], []
    for i in range(args.repeats):
        ttft, total, answer = app_stream(client, args.new_tokens)
        b_ttft, b_total, b_n = bare_generate(loaded, args.new_tokens)
        # Greedy decoding of the same prompt: the app's answer is the bare one, token for
        # token, so both are divided by the bare count (re-tokenizing the text the page
        # shows counts differently: 91 tokens for 64 generated in a first run).
        ours_tps.append(b_n / total)
        ours_ttft.append(ttft)
        bare_tps.append(b_n / b_total)
        bare_ttft.append(b_ttft)
        log(f"stream {i}: app {total:.2f} s ttft {ttft * 1000:.0f} ms | bare {b_n} tok "
            f"{b_total:.2f} s ttft {b_ttft * 1000:.0f} ms")  # fmt: skip
    ratios = [o / b for o, b in zip(ours_tps, bare_tps, strict=True)]
    return {
        "stream_tps": statistics.median(ours_tps),
        "bare_tps": statistics.median(bare_tps),
        "stream_tps_ratio": statistics.median(ratios),
        "ttft_s": statistics.median(ours_ttft),
        "bare_ttft_s": statistics.median(bare_ttft),
    }


QUESTIONS = [
    "Explain how a bicycle gear works.",
    "Give me a tip for learning Python.",
    "Why is the sky blue?",
    "How do I boil an egg?",
    "What is a prime number?",
    "What does a CPU do?",
    "Describe a rainy day in a city.",
    "How do plants make food?",
]


def sweep_level(server, n: int, new_tokens: int) -> dict:
    """``n`` chats streaming at once, each answer in its own thread (as Gradio runs them)."""
    sampling = {"temperature": 0.7, "top_p": 0.9, "max_new_tokens": new_tokens}
    records: list[dict] = []
    lock = threading.Lock()

    def chat(i: int) -> None:
        messages = [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]},
        ]
        record: dict = {"ok": False}
        try:
            gen = server.stream(messages, sampling, seed=i)
            gen.consume()
            times = gen.token_times
            gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
            record.update(ok=True, tokens=gen.new_tokens, ttft=gen.first_token_s, gaps=gaps)
        except Exception as error:  # counted in "failed"
            record["error"] = f"{type(error).__name__}: {error}"
        with lock:
            records.append(record)

    threads = [threading.Thread(target=chat, args=(i,)) for i in range(n)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ok = [r for r in records if r["ok"]]
    gaps = [g for r in ok for g in r["gaps"]]
    ttfts = [r["ttft"] for r in ok if r["ttft"] is not None]
    return {
        "n": n,
        "agg_tps": round(sum(r["tokens"] for r in ok) / wall, 2),
        "ttft_p50_s": round(percentile(ttfts, 50), 3) if ttfts else None,
        "ttft_p95_s": round(percentile(ttfts, 95), 3) if ttfts else None,
        "itl_p50_ms": round(percentile(gaps, 50) * 1000, 1) if gaps else None,
        "itl_p95_ms": round(percentile(gaps, 95) * 1000, 1) if gaps else None,
        "failed": len(records) - len(ok),
        "tokens": sum(r["tokens"] for r in ok),
        "wall_s": round(wall, 2),
    }


def bench_concurrency(args, loaded, settings) -> dict:
    from rlhf_core.serving import PolicyServer

    servers = {
        "batched": PolicyServer(loaded, settings.model_copy(update={"serving_backend": "batched"})),
        "sequential": PolicyServer(
            loaded, settings.model_copy(update={"serving_backend": "sequential"})
        ),
    }
    if args.vllm_url:
        from rlhf_core.vllm_backend import VLLMPolicyServer

        servers["vllm"] = VLLMPolicyServer(
            settings.model_copy(update={"serving_backend": "vllm", "vllm_url": args.vllm_url}),
            tokenizer=loaded.tokenizer,
        )
    out: dict = {}
    for name, server in servers.items():
        sweep_level(server, 2, 8)  # warm-up
        rows = []
        for n in (args.vllm_levels or args.levels) if name == "vllm" else args.levels:
            row = sweep_level(server, n, args.new_tokens)
            log(f"{name} n={n}: {row}")
            rows.append(row)
        out[name] = rows
    # Single chat against a bare generate of the same greedy answer, interleaved.
    greedy = {"temperature": 0.0, "max_new_tokens": args.new_tokens}
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": PROMPT}]
    ratios = []
    for i in range(args.repeats):
        t0 = time.perf_counter()
        ours = servers["batched"].stream(messages, greedy).consume()
        ours_s = time.perf_counter() - t0
        _, bare_s, bare_n = bare_generate(loaded, args.new_tokens)
        ratios.append((ours.new_tokens / ours_s) / (bare_n / bare_s))
        log(f"single {i}: batched {ours.new_tokens / ours_s:.1f} tok/s, "
            f"bare {bare_n / bare_s:.1f} tok/s")  # fmt: skip
    for server in servers.values():
        server.close()
    by_n = {name: {r["n"]: r for r in rows} for name, rows in out.items()}
    result = {
        "concurrency": out["batched"],
        "concurrency_sequential": out["sequential"],
        "single_vs_bare": round(statistics.median(ratios), 3),
        "sweep_new_tokens": args.new_tokens,
    }
    if 8 in by_n["batched"]:
        result["batch_speedup_8"] = round(
            by_n["batched"][8]["agg_tps"] / by_n["sequential"][8]["agg_tps"], 2
        )
    if "vllm" in out:
        result["concurrency_vllm"] = out["vllm"]
    return result


def bench_ingest(args, redis_url: str) -> dict:
    import redis

    from rlhf_core.feedback import Event, FeedbackStore, Turn

    client = redis.Redis.from_url(redis_url)
    store = FeedbackStore(client)
    turns = []
    for i in range(64):
        turn = Turn(
            turn_id=f"bench-turn-{i}",
            session_id=f"bench-session-{i % 8}",
            user_id=f"bench-user-{i % 8}",
            messages=[{"role": "user", "content": PROMPT}],
            answer="A bicycle gear changes how far the wheel turns per pedal stroke.",
        )
        store.save_turn(turn)
        turns.append(turn)
    n = args.events

    def make_events(tag: str) -> list[Event]:
        return [
            Event.new(
                turn_id=turns[i % len(turns)].turn_id,
                kind="like" if i % 2 else "dislike",
                session_id=turns[i % len(turns)].session_id,
                user_id=turns[i % len(turns)].user_id,
            )
            for i in range(n)
        ]

    def ours() -> float:
        events = make_events("ours")
        threads = 8
        chunks = [events[t::threads] for t in range(threads)]

        def write(chunk) -> None:
            local = FeedbackStore(redis.Redis.from_url(redis_url))
            for event in chunk:
                local.record_event(event)

        workers = [threading.Thread(target=write, args=(c,)) for c in chunks]
        start = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        return n / (time.perf_counter() - start)

    def raw() -> float:
        events = make_events("raw")
        start = time.perf_counter()
        for at in range(0, n, 100):
            pipe = client.pipeline(transaction=False)
            for event in events[at : at + 100]:
                pipe.xadd("bench:raw", {"event": event.to_json()})
            pipe.execute()
        return n / (time.perf_counter() - start)

    def ours_bulk() -> float:
        events = make_events("bulk")
        start = time.perf_counter()
        for at in range(0, n, 100):
            store.record_events(events[at : at + 100])
        return n / (time.perf_counter() - start)

    click_rates, bulk_rates, raw_rates = [], [], []
    for i in range(args.repeats):
        click_rates.append(ours())
        bulk_rates.append(ours_bulk())
        raw_rates.append(raw())
        log(
            f"ingest {i}: one click per call (8 threads) {click_rates[-1]:.0f}/s, "
            f"record_events x100 {bulk_rates[-1]:.0f}/s, raw XADD x100 {raw_rates[-1]:.0f}/s"
        )
    return {
        "ingest_events_per_s": statistics.median(bulk_rates),
        "raw_xadd_per_s": statistics.median(raw_rates),
        # Same batching on both sides (100 per call): the store (turn check, then the
        # atomic script: idempotency marker, XADD, per-turn index) against a bare XADD.
        "ingest_ratio": statistics.median(
            [b / r for b, r in zip(bulk_rates, raw_rates, strict=True)]
        ),
        # What one vote per HTTP request costs: one script and one fsync per event.
        "ingest_single_events_per_s": statistics.median(click_rates),
        "ingest_single_ratio": statistics.median(
            [c / r for c, r in zip(click_rates, raw_rates, strict=True)]
        ),
    }


def bench_vote(args, url: str) -> dict:
    """A vote on an answer of the same chat, through Gradio's HTTP API (POST
    /gradio_api/call/vote with the chat's session, then read the result's event
    stream until it completes), on one keep-alive connection. Also timed through
    ``gradio_client.Client.predict``, which polls its queue every 50 ms."""
    import httpx
    from gradio_client import Client

    client = Client(url, verbose=False)
    client.predict(api_name="/new_chat")
    _, answers, *_ = client.predict(PROMPT, SYSTEM, 0.7, 0.9, 8, api_name="/send")
    index = answers[-1]["index"]
    # The session cookie the server issued to this client: a chat answers only the
    # browser (cookie) it is bound to (chat_ui/access.py).
    http = httpx.Client(
        base_url=url.rstrip("/") + "/gradio_api", timeout=30, cookies=client.cookies
    )

    def vote_http(kind: str) -> None:
        body = {"data": [index, kind], "session_hash": client.session_hash}
        event_id = http.post("/call/vote", json=body).raise_for_status().json()["event_id"]
        with http.stream("GET", f"/call/vote/{event_id}") as stream:
            for line in stream.iter_lines():
                if line.startswith("event: complete"):
                    return
                if line.startswith("event: error"):
                    raise RuntimeError(f"vote failed: {line}")
        raise RuntimeError("vote stream ended without a result")

    def timed(vote) -> list[float]:
        latencies = []
        for i in range(args.votes + 10):
            start = time.perf_counter()
            vote("like" if i % 2 else "dislike")
            if i >= 10:  # the first calls warm connections up
                latencies.append((time.perf_counter() - start) * 1000)
        return latencies

    over_http = timed(vote_http)
    with_client = timed(lambda kind: client.predict(index, kind, api_name="/vote"))
    http.close()
    return {
        "vote_p50_ms": percentile(over_http, 50),
        "vote_p99_ms": percentile(over_http, 99),
        "votes": len(over_http),
        "vote_gradio_client_p50_ms": percentile(with_client, 50),
        "vote_gradio_client_p99_ms": percentile(with_client, 99),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    parser.add_argument("--model-cache-dir", type=Path, default=Path.home() / ".cache/rlhf-chat")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--events", type=int, default=4000)
    parser.add_argument("--votes", type=int, default=200)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "serving.json")
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--vllm-url", default=None, help="also sweep this vLLM server")
    parser.add_argument("--vllm-levels", type=int, nargs="+", default=None,
                        help="levels for the vLLM sweep (default: --levels)")  # fmt: skip
    parser.add_argument(
        "--sweep-only",
        action="store_true",
        help="run only the concurrency sweep; its keys are merged into --out",
    )
    args = parser.parse_args()
    command = "python benchmarks/serving.py " + " ".join(sys.argv[1:])
    if args.sweep_only:
        from rlhf_core.modeling import load_base_model
        from rlhf_core.settings import Settings

        settings = Settings(base_model=args.model, model_cache_dir=args.model_cache_dir)
        loaded = load_base_model(settings)
        sweep = bench_concurrency(args, loaded, settings)
        sweep["sweep_command"] = command
        result = json.loads(args.out.read_text()) if args.out.exists() else {}
        result.update(sweep)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(sweep, indent=2))
        return

    from rlhf_core.modeling import load_base_model
    from rlhf_core.redis_server import EmbeddedValkey, free_port
    from rlhf_core.settings import Settings

    data_dir = Path(tempfile.mkdtemp(prefix="rlhf-serving-"))
    server = EmbeddedValkey(data_dir / "valkey").start()
    env = {
        "RLHF_REDIS_URL": server.url,
        "RLHF_DATA_DIR": str(data_dir),
        "RLHF_BASE_MODEL": args.model,
        "RLHF_MODEL_CACHE_DIR": str(args.model_cache_dir),
        "RLHF_TRAIN_EVERY": "1000000",  # no training rounds during the benchmark
    }
    port = free_port()
    app = start_app(env, port, data_dir)
    url = f"http://127.0.0.1:{port}/"
    try:
        loaded = load_base_model(
            Settings(base_model=args.model, model_cache_dir=args.model_cache_dir)
        )
        result = {"model": args.model, "new_tokens": args.new_tokens}
        result.update(bench_stream(args, loaded, url))
        result.update(bench_vote(args, url))
        result.update(bench_ingest(args, server.url))
    finally:
        app.terminate()
        app.wait(timeout=30)
        server.stop()
    result["command"] = "python benchmarks/serving.py " + " ".join(sys.argv[1:])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
