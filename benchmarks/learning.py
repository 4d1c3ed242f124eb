#!/usr/bin/env python
"""Closed-loop learning benchmark: simulated users chat through the real app.

Simulated users talk to a running ``rlhf-chat up`` through its HTTP API
(``gradio_client``: the same endpoints the page calls), and react as an oracle
file says: ``judge(prompt, response) -> bool`` gives 👍 or 👎 and
``rewrite(prompt, response) -> str | None`` an edited answer. Nothing goes
around Redis, Celery or the registry: the app logs the feedback, the worker
trains and publishes, the app swaps the version in.

After the run, every published version is evaluated on held-out prompts with
fixed sampling settings and seeds, from the adapter the registry holds:
the oracle's 👍 rate, mean KL to the reference per answer (the sum over answer
tokens of log pi(y|x) - log pi_ref(y|x), a Monte-Carlo estimate of the sequence
KL), mean answer length in words, and the reward model's held-out accuracy that
the round recorded.

    python benchmarks/learning.py --oracle ../shared/eval/oracle_concise.py \
        --rounds 6 --feedback-per-round 32 --out benchmarks/results/learning/concise

Writes ``learning.json``, ``learning.png`` and ``learning.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from types import ModuleType
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SHARED_EVAL = ROOT.parent / "shared" / "eval"
FOOTER = re.compile(r"\n\n<sub>.*?</sub>\s*$", re.DOTALL)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see rlhf_core/__init__.py
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def log(*parts: Any) -> None:
    print(time.strftime("%H:%M:%S"), *parts, file=sys.stderr, flush=True)


def load_oracle(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"oracle_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot load oracle {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for name in ("judge", "rewrite"):
        if not callable(getattr(module, name, None)):
            raise SystemExit(f"oracle {path} has no function {name}(prompt, response)")
    return module


def read_prompts(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --------------------------------------------------------------------- the app
class App:
    """A running ``rlhf-chat up`` of our own (or one named by --url)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.process: subprocess.Popen | None = None
        self.data_dir = Path(args.data_dir or tempfile.mkdtemp(prefix="rlhf-learning-"))
        if args.url:
            self.url = args.url
            return
        port = free_port()
        self.url = f"http://127.0.0.1:{port}/"
        env = dict(os.environ)
        env.update(
            {
                "RLHF_DATA_DIR": str(self.data_dir),
                "RLHF_PORT": str(port),
                "RLHF_BASE_MODEL": args.model,
                "RLHF_TRAIN_EVERY": str(args.feedback_per_round),
                "RLHF_MAX_EVENTS_PER_USER": str(args.feedback_per_round),
                "RLHF_MAX_NEW_TOKENS": str(args.max_new_tokens),
                # The app's default sampling is what the gate's served KL samples with:
                # the run's own, as its simulated users get (not the app's default).
                "RLHF_TEMPERATURE": str(args.temperature),
                "RLHF_TOP_P": str(args.top_p),
                "RLHF_SEED": str(args.seed),
            }
        )
        env.pop("RLHF_REDIS_URL", None)
        if args.model_cache_dir:
            env["RLHF_MODEL_CACHE_DIR"] = str(args.model_cache_dir)
        self.log_file = open(self.data_dir / "app.log", "wb")  # noqa: SIM115
        cli = Path(sys.executable).with_name("rlhf-chat")
        self.process = subprocess.Popen(
            [str(cli), "up"], env=env, stdout=self.log_file, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        self._wait_ready()

    def _wait_ready(self, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process and self.process.poll() is not None:
                raise SystemExit(f"rlhf-chat up exited; see {self.data_dir / 'app.log'}")
            try:
                urllib.request.urlopen(self.url, timeout=2)
                return
            except OSError:
                time.sleep(1)
        raise SystemExit(f"the app did not answer at {self.url} within {timeout} s")

    def redis(self):
        from rlhf_core.redis_server import connect
        from rlhf_core.settings import Settings

        return connect(Settings(data_dir=self.data_dir), socket_timeout=10)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)


class SimulatedUser:
    """One browser session: a gradio_client Client has its own session hash."""

    def __init__(self, url: str, settings: dict[str, Any]) -> None:
        from gradio_client import Client

        self.client = Client(url, verbose=False)
        self.sampling = settings

    def ask(self, prompt: str) -> tuple[str, int, int]:
        """A new single-turn chat; returns (answer, answer index, policy version)."""
        self.client.predict(api_name="/new_chat")
        chat, answers, _badge, _box = self.client.predict(
            prompt,
            self.sampling["system_prompt"],
            self.sampling["temperature"],
            self.sampling["top_p"],
            self.sampling["max_new_tokens"],
            api_name="/send",
        )
        last = answers[-1]
        content = chat[-1]["content"]
        if isinstance(content, list):  # gradio may wrap text in a list of parts
            content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
        return FOOTER.sub("", str(content)), int(last["index"]), int(last["version"])

    def vote(self, index: int, liked: bool) -> None:
        self.client.predict(index, "like" if liked else "dislike", api_name="/vote")

    def rewrite(self, index: int, text: str) -> None:
        self.client.predict(index, text, api_name="/rewrite")


# ------------------------------------------------------------------ evaluation
def version_sanity(model: Any, tokenizer: Any, args) -> dict[str, Any] | None:
    """The sanity rate of one version (see benchmarks/sanity.py), sampled as the held-out
    answers are (the run's temperature and top-p, same seed for every version)."""
    path = getattr(args, "sanity_prompts", None)
    if path is None or not Path(path).exists():
        return None
    try:
        from benchmarks.sanity import read_sanity, sanity_rate
    except ImportError:  # run as a script: benchmarks/ itself is on sys.path
        from sanity import read_sanity, sanity_rate

    return sanity_rate(
        model, tokenizer, read_sanity(path), system_prompt=args.system_prompt,
        temperature=args.temperature, top_p=args.top_p, samples=args.sanity_samples,
        seed=args.seed, batch=args.eval_batch,
    )  # fmt: skip


def evaluate_versions(
    app: App, versions: list[int], eval_prompts: list[str], oracle: ModuleType, args
) -> dict[int, dict[str, Any]]:
    """Held-out 👍 rate, KL to the reference and answer length of each version."""
    import torch
    from peft import PeftModel

    from rlhf_core.chat_format import prompt_ids
    from rlhf_core.generation import Sampling, generate_kwargs, stop_token_ids
    from rlhf_core.modeling import load_base_model
    from rlhf_core.ppo import logprobs_from_logits, token_kl
    from rlhf_core.registry import Registry
    from rlhf_core.reward import position_ids_from
    from rlhf_core.settings import Settings

    sampling = Sampling(args.temperature, args.top_p, args.max_new_tokens)
    settings = Settings(
        data_dir=app.data_dir, base_model=args.model, model_cache_dir=args.model_cache_dir
    )
    registry = Registry(app.redis(), settings)
    loaded = load_base_model(settings)
    tokenizer = loaded.tokenizer
    contexts = [
        [{"role": "system", "content": args.system_prompt}, {"role": "user", "content": p}]
        for p in eval_prompts
    ]
    results: dict[int, dict[str, Any]] = {}
    model: Any = loaded.model
    for version in versions:
        adapter = registry.materialize(version) if version else None
        if adapter is not None:
            # (not "eval": peft adds the adapter name as a module attribute, and .eval exists)
            model = PeftModel.from_pretrained(loaded.model, str(adapter), adapter_name="candidate")
        model.eval()
        answers, kls, ratios = [], [], []
        for start in range(0, len(contexts), args.eval_batch):
            batch = contexts[start : start + args.eval_batch]
            # The chat encoding and the generate() arguments the app serves with (and the
            # gate samples with): no inherited top_k or repetition penalty.
            rows = [prompt_ids(tokenizer, messages) for messages in batch]
            width = max(len(r) for r in rows)
            pad = tokenizer.pad_token_id
            input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
            prompt_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
            stops = stop_token_ids(model, tokenizer)
            torch.manual_seed(args.seed + start)  # same sampling noise for every version
            with torch.inference_mode():
                out = model.generate(
                    input_ids=input_ids,
                    attention_mask=prompt_mask,
                    **generate_kwargs(sampling, eos_token_id=stops, pad_token_id=pad),
                )
                prompt_len = input_ids.shape[1]
                response = out[:, prompt_len:]
                # answer mask: generated tokens up to and including the first stop token
                is_eos = torch.isin(response, torch.tensor(stops))
                after_eos = (is_eos.cumsum(1) - is_eos.long()) > 0
                mask = (~after_eos).float()
                attention = torch.cat([prompt_mask, mask.long()], dim=1)
                forward = {
                    "input_ids": out,
                    "attention_mask": attention,
                    "position_ids": position_ids_from(attention),
                }
                logits = model(**forward).logits[:, prompt_len - 1 : -1]
                if adapter is not None:
                    with model.disable_adapter():
                        ref_logits = model(**forward).logits[:, prompt_len - 1 : -1]
                    # KL of the next-token distributions along the served answers (what
                    # the training gate measures too), and the sampled log-ratio of the
                    # answers themselves (reported as log_ratio).
                    kls.extend((token_kl(logits, ref_logits) * mask).sum(1).tolist())
                    logp = logprobs_from_logits(logits, response)
                    ref = logprobs_from_logits(ref_logits, response)
                    ratios.extend(((logp - ref) * mask).sum(1).tolist())
                else:
                    kls.extend([0.0] * len(batch))
                    ratios.extend([0.0] * len(batch))
            for row, m in zip(response, mask, strict=True):
                answers.append(tokenizer.decode(row[m.bool()], skip_special_tokens=True).strip())
        liked = [bool(oracle.judge(p, a)) for p, a in zip(eval_prompts, answers, strict=True)]
        sanity = version_sanity(model, tokenizer, args)
        meta = registry.get(version) if version else {}
        metrics = meta.get("metrics", {}) if isinstance(meta, dict) else {}
        results[version] = {
            "thumbs_up_rate": sum(liked) / len(liked),
            "kl": sum(kls) / len(kls),
            "log_ratio": sum(ratios) / len(ratios),
            "mean_words": sum(len(a.split()) for a in answers) / len(answers),
            # Plain facts still answered (shared/eval/prompts_sanity.tsv): learning a style
            # must not cost what the model knew.
            "sanity": sanity["rate"] if sanity else None,
            "sanity_misses": sanity["misses"][:5] if sanity else [],
            "rm_accuracy": metrics.get("reward/accuracy"),
            # What the round's gate measured on its own samples, beside the held-out
            # figure above: the two should agree within the gate's error.
            "gate_kl": metrics.get("objective/kl_served"),
            "gate_kl_ucb": metrics.get("objective/kl_served_ucb"),
            # How the round's KL search shrank it (1 and 1: the full step).
            "gate_update_fraction": metrics.get("gate/update_fraction"),
            "gate_base_scale": metrics.get("gate/base_scale"),
            # Answers behind gate_kl (twice RLHF_GATE_SAMPLES where a search's candidate was
            # measured again), how many held-out contexts they answered (0: the round's
            # PPO prompts), and the chosen sample's and the fresh one's means.
            "gate_samples": metrics.get("gate/samples"),
            "gate_unseen_prompts": metrics.get("gate/unseen_prompts"),
            "gate_chosen_kl": metrics.get("gate/chosen_kl_served"),
            "gate_fresh_kl": metrics.get("gate/fresh_kl_served"),
            # Everything the gate recorded, each measurement of the KL search included
            # (gate/try0_* is the full step).
            "gate": {k: v for k, v in metrics.items() if k.startswith("gate/")},
            # Where the round's time went (reward training, PPO steps, the gate's samples).
            "times": {k: v for k, v in metrics.items() if k.startswith("time/")},
            "samples": [
                {"prompt": p, "answer": a, "liked": ok}
                for p, a, ok in list(zip(eval_prompts, answers, liked, strict=True))[:6]
            ],
        }
        log(
            f"v{version}: 👍 {results[version]['thumbs_up_rate']:.2f} "
            f"sanity {format(sanity['rate'], '.2f') if sanity else '-'} "
            f"KL {results[version]['kl']:.2f} words {results[version]['mean_words']:.1f}"
        )
        if adapter is not None:
            model = model.unload()  # back to the bare base for the next version
    return results


# ------------------------------------------------------------------- the loop
def run(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    oracle = load_oracle(args.oracle)
    train_prompts = read_prompts(args.train_prompts)
    eval_prompts = read_prompts(args.eval_prompts)[: args.eval_n]
    sampling = {
        "system_prompt": args.system_prompt,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "max_new_tokens": args.max_new_tokens,
    }
    started = time.monotonic()
    app = App(args)
    log(f"app ready at {app.url} (data in {app.data_dir}) after {time.monotonic() - started:.0f} s")
    t0 = time.monotonic()
    rows: list[dict[str, Any]] = []
    failures: list[dict[str, Any]] = []
    try:
        from rlhf_core.registry import Registry
        from rlhf_core.settings import Settings

        registry = Registry(app.redis(), Settings(data_dir=app.data_dir))
        users = [SimulatedUser(app.url, sampling) for _ in range(args.users)]
        version = registry.current()
        for round_index in range(args.rounds):
            if time.monotonic() - t0 > args.time_budget_s:
                log("time budget spent; stopping")
                break
            events = liked_count = 0
            n = 0
            while events < args.feedback_per_round:
                user = users[n % len(users)]
                n += 1
                prompt = rng.choice(train_prompts)
                answer, index, served = user.ask(prompt)
                liked = bool(oracle.judge(prompt, answer))
                user.vote(index, liked)
                events += 1
                liked_count += liked
                if not liked and rng.random() < args.rewrite_rate:
                    better = oracle.rewrite(prompt, answer)
                    if better:
                        user.rewrite(index, better)
                        events += 1
            last_vote = time.monotonic()
            log(
                f"round {round_index + 1}: {n} answers, {events} events, "
                f"{liked_count}/{n} liked (served by v{served}); waiting for a new version"
            )
            new_version = wait_for_version(registry, version, args.round_timeout_s)
            if new_version is None:
                last = registry.last_round() or {}
                failures.append({"round": round_index + 1, **last})
                log(f"round {round_index + 1}: no new version ({last.get('reason', last)})")
                continue
            # the first answer the app serves from the new version
            while True:
                _, _, served = users[0].ask(rng.choice(train_prompts))
                if served >= new_version:
                    break
                time.sleep(0.2)
            rows.append(
                {
                    "version": new_version,
                    "round": round_index + 1,
                    "elapsed_s": round(time.monotonic() - t0, 1),
                    "vote_to_version_s": round(time.monotonic() - last_vote, 1),
                    "train_thumbs_up_rate": liked_count / n,
                }
            )
            log(f"v{new_version} served {rows[-1]['vote_to_version_s']} s after the last vote")
            version = new_version
        loop = {
            "loop_s": round(time.monotonic() - t0, 1),
            "failed_rounds": failures,
            "rows": rows,
            "data_dir": str(app.data_dir),
            # The code the loop trained with (an --eval-only later may run on another).
            "commit": source_commit(),
        }
        # Kept before the evaluation, so `--eval-only` can redo it from the data directory.
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "loop.json").write_text(json.dumps(loop, indent=2) + "\n")
        evaluated = evaluate_versions(
            app, [0] + [r["version"] for r in rows], eval_prompts, oracle, args
        )
    finally:
        app.stop()
    return assemble(args, loop, evaluated, time.monotonic() - started)


def source_commit() -> str | None:
    """The commit of the code that runs (with "+changes" when the tree differs from it), so
    that a results table can name it; None outside a git checkout."""

    def git(*cmd: str) -> str:
        return subprocess.run(
            ["git", *cmd], cwd=HERE.parent, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()

    try:
        commit = git("rev-parse", "--short=7", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", "rlhf_core", "chat_ui",
                    "worker", "benchmarks/learning.py")  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+changes" if dirty else "")


def assemble(args, loop: dict[str, Any], evaluated: dict[int, dict], elapsed: float) -> dict:
    base = {"version": 0, "round": 0, "elapsed_s": 0.0, "vote_to_version_s": None}
    versions = [{**row, **evaluated[row["version"]]} for row in [base, *loop["rows"]]]
    overrides = {k: v for k, v in os.environ.items() if k.startswith("RLHF_")}
    return {
        # The exact command and every RLHF_ override: "defaults" means this dict is empty.
        "command": " ".join(["python", *sys.argv]),
        "env_overrides": overrides,
        "commit": loop.get("commit"),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "loop_s": loop["loop_s"],
        "elapsed_s": round(elapsed, 1),
        "failed_rounds": loop["failed_rounds"],
        "versions": versions,
    }


def eval_only(args: argparse.Namespace) -> dict[str, Any]:
    """Evaluate the versions of a finished loop again (its data directory is kept)."""
    from rlhf_core.redis_server import EmbeddedValkey

    started = time.monotonic()
    loop = json.loads((args.out / "loop.json").read_text())
    server = EmbeddedValkey(Path(loop["data_dir"])).start()
    server.write_url_file()
    try:
        args.data_dir, args.url = Path(loop["data_dir"]), server.url
        target = App.__new__(App)  # only its data_dir and redis() are used here
        target.data_dir, target.process = args.data_dir, None
        oracle = load_oracle(args.oracle)
        eval_prompts = read_prompts(args.eval_prompts)[: args.eval_n]
        versions = [0] + [r["version"] for r in loop["rows"]]
        evaluated = evaluate_versions(target, versions, eval_prompts, oracle, args)
    finally:
        server.stop()
    return assemble(args, loop, evaluated, time.monotonic() - started)


def wait_for_version(registry, version: int, timeout: float) -> int | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        current = registry.current()
        if current > version:
            return current
        last = registry.last_round() or {}
        if last.get("status") == "failed" and float(last.get("at", 0)) > time.time() - 5:
            return None
        time.sleep(1)
    return None


# -------------------------------------------------------------------- outputs
def write_outputs(result: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    slim = {
        **result,
        "versions": [
            {k: v for k, v in row.items() if k != "samples"} for row in result["versions"]
        ],
    }
    (out / "learning.json").write_text(json.dumps(slim, indent=2) + "\n")
    plot(result, out / "learning.png")
    (out / "learning.md").write_text(report(result))


KL_BUDGET = 10.0  # RLHF_KL_BUDGET's default: the gate rejects a round above it


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["versions"]
    xs = [r["version"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(
        xs,
        [r["thumbs_up_rate"] for r in rows],
        "o-",
        color="tab:green",
        label="held-out thumbs-up rate",
    )
    ax.axhline(rows[0]["thumbs_up_rate"], color="tab:green", ls=":", lw=1, label="base version")
    ax.set_xlabel("policy version (minutes since the users started)")
    ax.set_ylabel("thumbs-up rate (oracle, held-out prompts)")
    ax.set_xticks(xs, [f"v{r['version']}\n{r['elapsed_s'] / 60:.0f} min" for r in rows])
    ax.set_ylim(0, 1)
    ax2 = ax.twinx()
    ax2.plot(xs, [r["kl"] for r in rows], "s--", color="tab:purple", label="KL to reference (nats)")
    ax2.axhline(KL_BUDGET, color="tab:purple", ls=":", lw=1, label="KL budget (gate)")
    ax2.set_ylabel("mean KL per answer (nats)")
    ax2.set_ylim(0, max(KL_BUDGET * 1.2, *[r["kl"] * 1.1 for r in rows]))
    oracle = Path(result["settings"]["oracle"]).stem
    ax.set_title(f"rlhf-chat learning from {oracle}")
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(result: dict[str, Any]) -> str:
    s = result["settings"]
    rows = result["versions"]
    lines = [
        f"# Learning benchmark: {Path(s['oracle']).stem}",
        "",
        f"Model {s['model']}, {s['rounds']} rounds of {s['feedback_per_round']} feedback events, "
        f"rewrite rate {s['rewrite_rate']}, seed {s['seed']}; loop {result['loop_s']:.0f} s, "
        f"total {result['elapsed_s']:.0f} s.",
        "",
        f"Command: `{' '.join(f'{k}={v}' for k, v in result.get('env_overrides', {}).items())}"
        f"{' ' if result.get('env_overrides') else ''}{result.get('command', '')}`",
        "",
        "KL: per answer, the exact KL of the version's next-token distribution to the base "
        "model's, summed along the held-out answers as served (temperature "
        f"{s['temperature']}, top-p {s['top_p']}); log-ratio: log p(answer) - log p_base(answer) "
        "of those same answers.",
        "",
        "Gate KL: what the round's gate measured on its own samples (its upper bound in brackets).",
        "",
        "Sanity: share of answers to the plain factual prompts of prompts_sanity.tsv that "
        "contain the right word (same sampling).",
        "",
        "| version | 👍 rate | sanity | KL (nats) | gate KL | log-ratio | mean words "
        "| RM accuracy | elapsed s | vote→version s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    def number(value: Any, fmt: str = ".2f") -> str:
        return "" if value is None else format(float(value), fmt)

    for r in rows:
        gate = number(r.get("gate_kl"))
        if r.get("gate_kl_ucb") is not None:
            gate += f" [{number(r['gate_kl_ucb'])}]"
        lines.append(
            f"| {r['version']} | {r['thumbs_up_rate']:.2f} | {number(r.get('sanity'))} "
            f"| {r['kl']:.2f} | {gate} "
            f"| {number(r.get('log_ratio'))} | {r['mean_words']:.1f} "
            f"| {number(r.get('rm_accuracy'))} | {r['elapsed_s']} "
            f"| {r['vote_to_version_s'] or ''} |"
        )
    if result["failed_rounds"]:
        lines += ["", "Rounds that published nothing:", ""]
        for failed in result["failed_rounds"]:
            lines.append(f"- round {failed.get('round')}: {failed.get('reason', failed)}")
    for label, row in (("base version", rows[0]), ("last version", rows[-1])):
        lines += ["", f"## Spot check: {label} (v{row['version']})", ""]
        for sample in row["samples"][:4]:
            verdict = "👍" if sample["liked"] else "👎"
            lines.append(f"- **{sample['prompt']}** {verdict} {sample['answer'][:300]!r}")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="a running rlhf-chat app; default: start our own")
    parser.add_argument(
        "--data-dir", type=Path, help="data dir of the app (with --url: to reach its Redis)"
    )
    parser.add_argument("--oracle", type=Path, default=SHARED_EVAL / "oracle_concise.py")
    parser.add_argument("--train-prompts", type=Path, default=SHARED_EVAL / "prompts_train.txt")
    parser.add_argument("--eval-prompts", type=Path, default=SHARED_EVAL / "prompts_heldout.txt")
    parser.add_argument("--eval-n", type=int, default=32, help="held-out prompts evaluated")
    parser.add_argument(
        "--sanity-prompts", type=Path, default=SHARED_EVAL / "prompts_sanity.tsv",
        help="plain factual prompts whose answer rate is reported per version",
    )  # fmt: skip
    parser.add_argument("--sanity-samples", type=int, default=1, help="answers per prompt")
    parser.add_argument("--eval-batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--feedback-per-round", type=int, default=32)
    parser.add_argument("--rewrite-rate", type=float, default=0.5)
    parser.add_argument("--users", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    parser.add_argument("--model-cache-dir", type=Path, default=Path.home() / ".cache/rlhf-chat")
    parser.add_argument("--system-prompt", default="You are a helpful assistant.")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--round-timeout-s", type=float, default=600)
    parser.add_argument("--time-budget-s", type=float, default=20 * 60)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "learning")
    parser.add_argument(
        "--eval-only", action="store_true", help="evaluate again from --out/loop.json"
    )
    args = parser.parse_args()
    # SIGTERM (a timeout, Ctrl-C of a wrapper) unwinds like Ctrl-C, so the app we started stops too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    result = eval_only(args) if args.eval_only else run(args)
    write_outputs(result, args.out)
    rows = result["versions"]
    print(json.dumps({k: v for k, v in rows[-1].items() if k != "samples"}))
    log(
        f"👍 rate {rows[0]['thumbs_up_rate']:.2f} -> {rows[-1]['thumbs_up_rate']:.2f}; "
        f"wrote {args.out}"
    )


if __name__ == "__main__":
    main()
