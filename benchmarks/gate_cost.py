"""Cost of one training round's stages on the tiny model, and of the KL gate's
measurement by sample count: what RLHF_GATE_SAMPLES costs per round.

    flock /work/bench.lock nice -n 0 .venv/bin/python benchmarks/gate_cost.py

Prints one JSON line per gate sample count with the round's stage timings
(``time/reward_train_s``, PPO ``time/step_s`` x steps, ``time/served_kl_s``) and the
gate's KL mean and upper bound. The tiny random model (2 layers, SmolLM2's tokenizer)
rarely emits EOS, so every gate answer runs to the served limit: a worst case in tokens.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch

from rlhf_core.modeling import load_base_model
from rlhf_core.settings import Settings
from rlhf_core.trainer import run_training_round


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    prompts = [[{"role": "user", "content": f"Tell me about topic {i}."}] for i in range(16)]
    pairs = [
        {"messages": p, "chosen": f"A short answer {i}.", "rejected": f"No {i}."}
        for i, p in enumerate(prompts)
    ]
    for n in args.samples:
        settings = Settings(
            base_model="tiny-random", gate_samples=n, max_new_tokens=args.max_new_tokens
        )
        base = load_base_model(settings)
        with tempfile.TemporaryDirectory() as out:
            start = time.perf_counter()
            result = run_training_round(
                base, settings, pointwise=[], pairs=pairs, prompts=prompts,
                policy_dir=None, reward_dir=None, out_dir=out,
            )  # fmt: skip
            total = time.perf_counter() - start
        m = result.metrics
        print(json.dumps({
            "gate_samples": n, "max_new_tokens": args.max_new_tokens,
            "round_s": round(total, 2),
            "reward_train_s": round(m["time/reward_train_s"], 2),
            "ppo_step_s": round(m["time/step_s"], 2), "ppo_steps": m["ppo/steps"],
            "gate_s": round(m["time/served_kl_s"], 2),
            "kl_served": round(m["objective/kl_served"], 3),
            "kl_served_ucb": round(m["objective/kl_served_ucb"], 3),
        }), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
