#!/usr/bin/env python
"""Benchmark: one PPO step of rlhf_core's trainer vs. its floor and vs. TRL 0.11 (issue 3).

Shapes: SmolLM2-135M-Instruct on the CPU, batch 8 prompts (../shared/eval/prompts_train.txt,
chat template applied, left-padded), 48 new tokens, 4 PPO epochs; one warm-up step, then the
median of --steps timed steps.

Three measurements, each in a child process of its own run one after the other, so none
competes with another for the CPU and each has its own peak RSS:

* ``floor``: the same shapes and adapters as bare calls on one shared base model (policy LoRA +
  reward LoRA with a scalar head): one ``generate``, one reference forward (adapters disabled),
  one reward forward, 4 x (forward + backward + AdamW step) of the policy adapter.
* ``ours``: rlhf_core.trainer's real PPO step (rollout, scoring, update), with its own breakdown.
* ``trl`` (with --peer-python): ../shared/peers/trl011_ppo_step.py in its own venv
  (benchmarks/peer_trl.sh creates it), ``PPOTrainer.step`` on the same shapes.

The command that wrote benchmarks/results/ppo_step.json (see benchmarks/results/ppo_step.md):

    benchmarks/peer_trl.sh setup      # once: /work/peer-venv with trl 0.11.4
    .venv/bin/python benchmarks/ppo_step.py --peer-python /work/peer-venv/bin/python

Keys read by tools outside the project: step_s, gen_s, score_s, update_s, floor_s,
ratio_to_floor, peak_rss_mb, model_dir, trl_step_s, trl_peak_rss_mb, speedup_vs_trl,
mem_ratio_vs_trl. Timings are wall seconds; medians; ratios are within this one run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as rlhf_core/__init__.py does

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared"
DEFAULT_PROMPTS = SHARED / "eval" / "prompts_train.txt"
DEFAULT_PEER_SCRIPT = SHARED / "peers" / "trl011_ppo_step.py"
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "ppo_step.json"


def log(*parts: object) -> None:
    print(*parts, file=sys.stderr, flush=True)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def bench_settings(args: argparse.Namespace):
    from rlhf_core.settings import Settings

    return Settings(
        base_model=args.model,
        model_cache_dir=Path(args.model_cache_dir).expanduser(),
        device="cpu",
        ppo_batch_size=args.batch,
        ppo_new_tokens=args.new_tokens,
        ppo_epochs=args.epochs,
        seed=args.seed,
    )


def load_prompts(args: argparse.Namespace) -> list[list[dict]]:
    lines = [ln.strip() for ln in Path(args.prompts).read_text().splitlines() if ln.strip()]
    from rlhf_core.settings import Settings

    system = Settings().system_prompt
    return [
        [{"role": "system", "content": system}, {"role": "user", "content": p}]
        for p in lines[: args.batch]
    ]


def median_of(samples: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(s[k] for s in samples) for k in samples[0]}


# ----------------------------------------------------------------------------- floor


def run_floor(args: argparse.Namespace) -> dict:
    """Bare calls with the same shapes and adapters: the least any trainer must do."""
    import torch
    from peft import get_peft_model

    from rlhf_core.modeling import load_base_model, lora_config

    torch.manual_seed(args.seed)
    settings = bench_settings(args)
    base = load_base_model(settings, device=torch.device("cpu"))
    tok = base.tokenizer
    model = get_peft_model(base.model, lora_config(settings), adapter_name="policy")
    model.add_adapter("reward", lora_config(settings))
    hidden = base.model.config.hidden_size
    reward_head = torch.nn.Linear(hidden, 1)
    value_head = torch.nn.Linear(hidden, 1)
    model.set_adapter("policy")  # also makes only the policy adapter trainable
    params = [p for p in model.parameters() if p.requires_grad] + list(value_head.parameters())
    opt = torch.optim.AdamW(params, lr=1e-5)

    texts = tok.apply_chat_template(load_prompts(args), tokenize=False, add_generation_prompt=True)
    enc = tok(texts, padding=True, return_tensors="pt", add_special_tokens=False)
    prompt = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    P = prompt["input_ids"].shape[1]
    gen_kwargs = dict(
        do_sample=True,
        top_k=0,
        top_p=1.0,
        max_new_tokens=args.new_tokens,
        min_new_tokens=args.new_tokens,  # fixed length, as the TRL peer does
        pad_token_id=tok.pad_token_id,
    )

    def response_logprobs(out, seq):
        logits = out.logits[:, P - 1 : -1]
        return torch.log_softmax(logits.float(), -1).gather(-1, seq[:, P:, None]).squeeze(-1)

    samples = []
    for it in range(args.steps + 1):
        model.set_adapter("policy")
        model.eval()
        t0 = time.perf_counter()
        with torch.no_grad():
            seq = model.generate(**prompt, **gen_kwargs)
        t1 = time.perf_counter()
        attn = torch.cat(
            [
                prompt["attention_mask"],
                torch.ones(seq.shape[0], seq.shape[1] - P, dtype=torch.long),
            ],
            1,
        )
        with torch.no_grad(), model.disable_adapter():
            ref_lp = response_logprobs(model(input_ids=seq, attention_mask=attn), seq)
        t2 = time.perf_counter()
        with torch.no_grad():
            model.set_adapter("reward")
            # The reward model reads the last hidden state; no vocabulary projection needed.
            h = model.base_model.model.model(input_ids=seq, attention_mask=attn).last_hidden_state
            scores = reward_head(h[:, -1]).squeeze(-1)
        t3 = time.perf_counter()
        model.set_adapter("policy")
        model.train()
        for _ in range(args.epochs):
            out = model(input_ids=seq, attention_mask=attn, output_hidden_states=True)
            lp = response_logprobs(out, seq)
            values = value_head(out.hidden_states[-1][:, P - 1 : -1]).squeeze(-1)
            loss = -(lp - ref_lp).mean() + ((values - scores[:, None]) ** 2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        t4 = time.perf_counter()
        s = dict(gen_s=t1 - t0, ref_s=t2 - t1, reward_s=t3 - t2, update_s=t4 - t3, step_s=t4 - t0)
        log(
            f"[floor] {'warmup' if it == 0 else f'iter{it}'}: "
            + " ".join(f"{k}={v:.2f}" for k, v in s.items())
            + f" seq={tuple(seq.shape)} prompt_len={P}"
        )
        if it > 0:
            samples.append(s)
    med = median_of(samples)
    return dict(
        floor_s=med["step_s"],
        floor_gen_s=med["gen_s"],
        floor_score_s=med["ref_s"] + med["reward_s"],
        floor_ref_s=med["ref_s"],
        floor_reward_s=med["reward_s"],
        floor_update_s=med["update_s"],
        floor_peak_rss_mb=peak_rss_mb(),
        floor_samples=samples,
        model_dir=base.model_dir,
        prompt_len=P,
        seq_len=int(seq.shape[1]),
        threads=torch.get_num_threads(),
    )


# ------------------------------------------------------------------------------ ours


def run_ours(args: argparse.Namespace) -> dict:
    """rlhf_core.trainer's real PPO step (reward model scoring, value head, adaptive KL);
    the gen/score/update breakdown comes from the trainer's own ``time/*`` metrics."""
    import torch

    from rlhf_core.modeling import load_base_model
    from rlhf_core.reward import RewardModel
    from rlhf_core.trainer import PPOConfig, PPOTrainer, attach_policy

    torch.manual_seed(args.seed)
    settings = bench_settings(args)
    base = load_base_model(settings, device=torch.device("cpu"))
    model, value_head, _ = attach_policy(base, settings, None)
    reward_model = RewardModel.attach(model, base.tokenizer, settings, None)
    overrides = {}
    if args.micro_batch:
        overrides["micro_batch_size"] = args.micro_batch
    # Fixed-length answers, as in the floor and the TRL peer: the same shapes every step.
    config = PPOConfig.from_settings(
        settings, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, **overrides
    )
    ppo = PPOTrainer(
        model, base.tokenizer, config, reward_model=reward_model, value_head=value_head
    )
    prompts = load_prompts(args)
    samples = []
    for it in range(args.steps + 1):
        t0 = time.perf_counter()
        metrics = ppo.step(prompts)
        step_s = time.perf_counter() - t0
        s = dict(
            step_s=step_s,
            gen_s=float(metrics["time/gen_s"]),
            score_s=float(metrics["time/score_s"]),
            update_s=float(metrics["time/update_s"]),
            ppo_updates=float(metrics.get("ppo/updates", float("nan"))),
        )
        log(
            f"[ours] {'warmup' if it == 0 else f'step{it}'}: "
            + " ".join(f"{k}={v:.2f}" for k, v in s.items())
            + f" updates={metrics.get('ppo/updates')} kl={metrics.get('objective/kl'):.4f}"
            + f" answer_tokens={metrics.get('objective/answer_tokens')}"
        )
        if it > 0:
            samples.append(s)
    med = median_of(samples)
    return dict(
        **med,
        peak_rss_mb=peak_rss_mb(),
        model_dir=base.model_dir,
        samples=samples,
        ppo_config={k: v for k, v in vars(config).items()},
    )


# ------------------------------------------------------------------------------ parent


def run_child(mode: str, args: argparse.Namespace, argv: list[str]) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", mode, *argv]
    log(f"[parent] running {mode}: {' '.join(cmd)}")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(
            f"the {mode} measurement failed (exit {proc.returncode}); see its stderr above"
        )
    log(f"[parent] {mode} took {time.perf_counter() - t0:.0f} s")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_peer(args: argparse.Namespace, model_dir: str) -> dict:
    cmd = [
        args.peer_python,
        str(args.peer_script),
        "--model", model_dir,
        "--batch", str(args.batch),
        "--new-tokens", str(args.new_tokens),
        "--steps", str(args.peer_steps),
        "--seed", str(args.seed),
    ]  # fmt: skip
    log(f"[parent] running TRL peer: {' '.join(cmd)}")
    t0 = time.perf_counter()
    proc = subprocess.run(
        cmd, stdout=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )
    if proc.returncode != 0:
        raise SystemExit(
            f"the TRL peer failed (exit {proc.returncode}); run benchmarks/peer_trl.sh setup first"
        )
    log(f"[parent] TRL peer took {time.perf_counter() - t0:.0f} s")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    ap.add_argument("--model-cache-dir", default=str(Path.home() / ".cache" / "rlhf-chat"))
    ap.add_argument("--prompts", default=str(DEFAULT_PROMPTS))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up (median)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    ap.add_argument(
        "--peer-python", default=None, help="python of the TRL 0.11.4 venv (benchmarks/peer_trl.sh)"
    )
    ap.add_argument("--peer-script", default=str(DEFAULT_PEER_SCRIPT))
    ap.add_argument("--peer-steps", type=int, default=3)
    ap.add_argument(
        "--micro-batch", type=int, default=0, help="trainer micro-batch (0 = its default)"
    )
    ap.add_argument(
        "--only", choices=["floor", "ours"], default=None, help="skip the other measurement"
    )
    ap.add_argument("--child", choices=["floor", "ours"], default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child:
        result = run_floor(args) if args.child == "floor" else run_ours(args)
        print(json.dumps(result), flush=True)
        return

    passthrough = [
        "--model", args.model, "--model-cache-dir", args.model_cache_dir,
        "--prompts", args.prompts, "--batch", str(args.batch),
        "--new-tokens", str(args.new_tokens), "--epochs", str(args.epochs),
        "--steps", str(args.steps), "--seed", str(args.seed),
        "--micro-batch", str(args.micro_batch),
    ]  # fmt: skip
    import torch

    out: dict = dict(
        batch=args.batch,
        new_tokens=args.new_tokens,
        ppo_epochs=args.epochs,
        timed_steps=args.steps,
        machine=f"{platform.machine()} {os.cpu_count()} cpus",
        torch_version=torch.__version__,
        command=" ".join([Path(sys.executable).name, *sys.argv]),
    )
    # The load average shows how busy the (shared) machine was: timings taken while other
    # processes compete for the cores are noisy; the per-iteration samples show how noisy.
    out["loadavg_start"] = list(os.getloadavg())

    def write(complete: bool) -> None:
        rounded = {k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}
        rounded["complete"] = complete
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(rounded, indent=2) + "\n")

    if args.only != "ours":
        out.update(run_child("floor", args, passthrough))
        write(False)  # a partial result survives an interrupted run
    if args.only != "floor":
        ours = run_child("ours", args, passthrough)
        out.update(ours)
    if "step_s" in out and "floor_s" in out:
        out["ratio_to_floor"] = out["step_s"] / out["floor_s"]
    write(False)
    if args.peer_python:
        peer = run_peer(args, out["model_dir"])
        out.update(
            trl_step_s=peer["total_s_median"],
            trl_gen_s=peer["gen_s_median"],
            trl_update_s=peer["step_s_median"],
            trl_peak_rss_mb=peer["peak_rss_mb"],
            trl_version=peer.get("trl_version"),
        )
        if "step_s" in out:
            out["speedup_vs_trl"] = out["trl_step_s"] / out["step_s"]
            out["mem_ratio_vs_trl"] = out["peak_rss_mb"] / out["trl_peak_rss_mb"]
    out["loadavg_end"] = list(os.getloadavg())
    write(True)
    print(Path(args.out).read_text())


if __name__ == "__main__":
    main()
