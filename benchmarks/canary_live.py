#!/usr/bin/env python
"""Benchmark: a good and a harmful candidate, judged by simulated users through the real app.

1. Two adapters on the real base model (SmolLM2-135M-Instruct by default), trained here
   the same way except for the sign of the user: the base model answers the train
   prompts a few times; the oracle's 👍 answers and its rewrites of the 👎 ones are
   the demonstrations of the *good* adapter (what this user prefers), the 👎 answers
   those of the *harmful* one (trained on the flipped oracle). A few LoRA epochs each.
2. The real app (embedded Valkey, the Gradio UI in this process, a Celery worker
   subprocess running the canary loop) serves the base model as current. The good
   adapter is published as the candidate for ``--share`` of users; simulated users
   (one gradio_client session each, so the sticky hash splits them) chat with random
   prompts and vote as the oracle says, until the worker decides. Then the harmful
   adapter is published as the candidate against whatever is current, until decided.
3. Votes and minutes to each decision, and the decision's numbers, go to the JSON.

    .venv/bin/python benchmarks/canary_live.py   # writes benchmarks/results/canary_live.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
SHARED_EVAL = ROOT.parent / "shared" / "eval"


def log(*parts) -> None:
    print(time.strftime("%H:%M:%S"), *parts, file=sys.stderr, flush=True)


def load_oracle(path: Path):
    spec = importlib.util.spec_from_file_location(f"oracle_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def train_adapters(settings, prompts, oracle, out: Path, samples: int, epochs: int, seed: int):
    """(good_dir, harmful_dir, stats): LoRA adapters fine-tuned on what the oracle likes
    and on what it dislikes, from the base model's own answers."""
    import torch
    from peft import get_peft_model

    from rlhf_core.chat_format import answer_ids, prompt_ids
    from rlhf_core.modeling import load_base_model, lora_config
    from rlhf_core.serving import PolicyServer

    loaded = load_base_model(settings)
    server = PolicyServer(loaded, settings)
    rng = random.Random(seed)
    torch.manual_seed(seed)
    liked, disliked = [], []
    started = time.monotonic()
    for prompt in prompts:
        messages = [{"role": "user", "content": prompt}]
        for _ in range(samples):
            text = server.generate(messages).text
            if oracle.judge(prompt, text):
                liked.append((messages, text))
            else:
                disliked.append((messages, text))
                better = oracle.rewrite(prompt, text)
                if better:
                    liked.append((messages, better))
        log(f"  {len(liked) + len(disliked)} base answers sampled")
    log(f"base answers: {len(liked)} liked or rewritten, {len(disliked)} disliked "
        f"({time.monotonic() - started:.0f} s)")  # fmt: skip
    stats = {"demos_good": len(liked), "demos_harmful": len(disliked)}

    tok = loaded.tokenizer
    for name, demos in (("good", liked), ("harmful", disliked)):
        model = get_peft_model(loaded.model, lora_config(settings))
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=settings.learning_rate)
        t0 = time.monotonic()
        for epoch in range(epochs):
            rng.shuffle(demos)
            total = 0.0
            for messages, text in demos:
                p_ids = prompt_ids(tok, messages)
                a_ids, _ = answer_ids(tok, text, settings.max_new_tokens)
                ids = torch.tensor([p_ids + a_ids])
                labels = torch.tensor([[-100] * len(p_ids) + a_ids])
                loss = model(input_ids=ids, labels=labels).loss
                loss.backward()
                opt.step()
                opt.zero_grad()
                total += float(loss.detach())
            log(f"{name} epoch {epoch}: loss {total / max(1, len(demos)):.3f}")
        model.save_pretrained(out / name)
        stats[f"train_s_{name}"] = round(time.monotonic() - t0, 1)
        # Back to the bare base model for the next adapter.
        loaded.model = model.unload()
    return out / "good", out / "harmful", stats


def _shared_eval() -> Path:
    """shared/eval beside the checkout (/work/main -> /work/shared) or beside the folder of
    worktrees (/work/wt/NAME -> /work/shared)."""
    for root in (ROOT.parent, ROOT.parent.parent):
        if (root / "shared" / "eval").is_dir():
            return root / "shared" / "eval"
    return SHARED_EVAL


def judge_candidate(app, registry, settings, args, name, version, users, prompts, oracle):
    """Simulated users chat and vote (``args.concurrency`` at once, as people would: the
    batched server answers them together) until the worker decides on ``version``, or
    ``args.max_minutes`` pass; then an admin override rolls it back so the run goes on."""
    import threading

    from rlhf_core import canary

    baseline = registry.candidate()["baseline"]
    log(f"{name} adapter is candidate v{version} against v{baseline}")
    deadline = time.monotonic() + 120
    while (app.watcher.candidate or {}).get("version") != version:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the UI did not load candidate v{version} within 120 s")
        time.sleep(0.5)
    started = time.monotonic()
    stop = threading.Event()
    lock = threading.Lock()
    votes: dict[int, list[int]] = {version: [0, 0], baseline: [0, 0]}
    errors: list[str] = []

    def still_out() -> bool:
        candidate = registry.candidate()
        return candidate is not None and candidate["version"] == version

    def user_loop(index: int) -> None:
        # Each thread speaks for its own people (a gradio_client is one browser).
        mine = users[index :: args.concurrency]
        rng = random.Random(args.seed * 1000 + index)
        while not stop.is_set() and still_out():
            user, prompt = rng.choice(mine), rng.choice(prompts)
            try:
                # One message per chat: an answer must depend on its version and prompt only.
                # In one long chat a version imitates the earlier answers in its context
                # (another version's, before the candidate came out): in the first run the
                # harmful adapter, 2 in 16 liked on fresh chats, was liked 51 times in 90.
                user.predict(api_name="/new_chat")
                _, answers, _, _ = user.predict(
                    prompt, settings.system_prompt, settings.temperature, settings.top_p,
                    args.max_new_tokens, api_name="/send",
                )  # fmt: skip
                served = answers[-1]["version"]
                # The answer as stored (the page's copy carries a footer).
                text = app.service.store.get_turn(answers[-1]["turn_id"]).answer
                liked = bool(oracle.judge(prompt, text))
                user.predict(-1, "like" if liked else "dislike", api_name="/vote")
            except Exception as error:  # noqa: BLE001  (counted and reported, not fatal)
                with lock:
                    errors.append(f"{type(error).__name__}: {error}"[:200])
                time.sleep(1)
                continue
            with lock:
                tally = votes.setdefault(served, [0, 0])
                tally[0] += liked
                tally[1] += 1
                n = sum(v[1] for v in votes.values())
                if n % 10 == 0:
                    log(f"{n} votes: " + ", ".join(f"v{k} {v[0]}/{v[1]}" for k, v in votes.items()))

    threads = [
        threading.Thread(target=user_loop, args=(i,), daemon=True) for i in range(args.concurrency)
    ]
    for thread in threads:
        thread.start()
    timed_out = False
    while still_out():
        if time.monotonic() - started > args.max_minutes * 60:
            timed_out = True
            break
        time.sleep(1)
    minutes = (time.monotonic() - started) / 60
    stop.set()
    for thread in threads:
        thread.join(timeout=120)
    override = None
    if timed_out:
        log(f"no decision on v{version} in {args.max_minutes} min: rolled back by override")
        override = canary.override(
            app.service.store.redis, settings, "rollback", by="benchmark (no decision in time)"
        )
    decision = next(
        (d for d in registry.decisions() if d["version"] == version and d.get("by") == "automatic"),
        None,
    )
    numbers = (decision or {}).get("numbers") or {}
    entry = {
        "name": name,
        "version": version,
        "baseline": baseline,
        "decision": decision["action"] if decision else None,
        "reason": decision.get("reason") if decision else None,
        # Votes the worker's test had counted when it decided (the candidate's and the
        # current version's), and minutes from the UI serving the candidate to the decision.
        "votes_at_decision": (
            numbers.get("candidate_votes", 0) + numbers.get("baseline_votes", 0)
            if decision
            else None
        ),  # fmt: skip
        "minutes_to_decision": round(numbers["elapsed_s"] / 60, 2) if decision else None,
        "votes_cast": sum(v[1] for v in votes.values()),  # incl. answers in flight at the end
        "votes_by_version": {str(k): {"likes": v[0], "votes": v[1]} for k, v in votes.items()},
        "minutes": round(minutes, 2),
        "numbers": numbers or None,
        "timed_out": timed_out,
        "override": override,
        "errors": len(errors),
        "first_errors": errors[:3],
    }
    log(f"{name}: {entry['decision']} after {entry['votes_at_decision']} votes, "
        f"{entry['minutes_to_decision']} min")  # fmt: skip
    return entry


def main() -> None:
    shared = _shared_eval()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--oracle", default=str(shared / "oracle_concise.py"))
    parser.add_argument("--prompts", default=str(shared / "prompts_train.txt"))
    parser.add_argument("--train-prompts", type=int, default=24)
    parser.add_argument("--samples", type=int, default=2, help="base answers per prompt")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--users", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=4, help="users chatting at once")
    parser.add_argument("--share", type=float, default=0.5)
    parser.add_argument("--min-votes", type=int, default=40)
    parser.add_argument("--burn-in", type=int, default=20)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--max-minutes", type=float, default=40.0, help="per candidate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default=None, help="base model (default: the settings')")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/canary_live.json"))
    args = parser.parse_args()

    from gradio_client import Client

    from chat_ui.app import serve
    from rlhf_core.redis_server import EmbeddedValkey, free_port
    from rlhf_core.registry import Registry
    from rlhf_core.settings import Settings

    run_started = time.monotonic()
    oracle = load_oracle(Path(args.oracle))
    prompts = [p for p in Path(args.prompts).read_text().splitlines() if p.strip()]
    rng = random.Random(args.seed)
    data_dir = Path(tempfile.mkdtemp(prefix="rlhf-canary-live-"))
    valkey = EmbeddedValkey(data_dir / "valkey").start()
    overrides = {
        "RLHF_DATA_DIR": str(data_dir),
        "RLHF_REDIS_URL": valkey.url,
        "RLHF_MAX_NEW_TOKENS": str(args.max_new_tokens),
        "RLHF_CANARY_SHARE": str(args.share),
        "RLHF_CANARY_MIN_VOTES": str(args.min_votes),
        "RLHF_CANARY_BURN_IN": str(args.burn_in),
        "RLHF_CANARY_CHECK_S": "2",
        "RLHF_TRAIN_EVERY": "1000000",  # no training rounds: the two candidates are fixed
    }
    if args.model:
        overrides["RLHF_BASE_MODEL"] = args.model
    os.environ.update(overrides)
    settings = Settings().model_copy(update={"port": free_port()})
    worker = app = None
    shown = {k: v for k, v in overrides.items() if k not in ("RLHF_DATA_DIR", "RLHF_REDIS_URL")}
    result: dict = {
        "command": "benchmarks/canary_live.py " + " ".join(sys.argv[1:]),
        "oracle": Path(args.oracle).name,
        "base_model": settings.base_model,
        "settings": shown,
        "rule": {
            "alpha": settings.canary_alpha,
            "margin": settings.canary_margin,
            "mixture_sd": settings.canary_mixture_sd,
            "min_votes": settings.canary_min_votes,
            "burn_in": settings.canary_burn_in,
            "max_votes_per_user": settings.canary_max_votes_per_user,
        },  # fmt: skip
        "users": args.users,
        "concurrency": args.concurrency,
        "candidates": [],
    }
    try:
        log("training the good and the harmful adapter")
        good, harmful, stats = train_adapters(
            settings, rng.sample(prompts, min(args.train_prompts, len(prompts))), oracle,
            data_dir / "adapters", args.samples, args.epochs, args.seed,
        )  # fmt: skip
        result["training"] = stats
        worker = subprocess.Popen(
            [sys.executable, "-m", "worker", "-n", "canary-live@%h"], cwd=ROOT,
            env=dict(os.environ), stdout=open(data_dir / "worker.log", "wb"),  # noqa: SIM115
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        app = serve(settings, block=False)
        registry = Registry(app.service.store.redis, settings)
        users = [Client(app.url, verbose=False) for _ in range(args.users)]
        for name, folder in (("good", good), ("harmful", harmful)):
            lock = registry.lock()
            token = lock.acquire()
            version = registry.publish(
                folder, {"parent": registry.current(), "benchmark": name}, token,
                canary_share=args.share,
            )  # fmt: skip
            lock.release()
            entry = judge_candidate(
                app, registry, settings, args, name, version, users, prompts, oracle
            )
            entry["current_after"] = registry.current()
            result["candidates"].append(entry)
            Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    finally:
        if app is not None:
            app.close()
        if worker is not None and worker.poll() is None:
            os.killpg(worker.pid, 15)
            try:
                worker.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(worker.pid, 9)
        valkey.stop()
    result["total_minutes"] = round((time.monotonic() - run_started) / 60, 1)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["candidates"], indent=2))


if __name__ == "__main__":
    main()
