#!/usr/bin/env python
"""Benchmark: one epoch of reward-model training, the reward adapter on the top
``RLHF_REWARD_LORA_LAYERS`` decoder layers (the default) against the same adapter on
every layer (the baseline), in one process on one loaded base model.

The data has the shape of one learning-benchmark round: 22 rated answers and 10
rewrite pairs (prompts from ../shared/eval/prompts_train.txt, answers of about 40
words). Each configuration trains a fresh adapter for one epoch; the two alternate
--repeats times and the figure is the median ratio of the pairs.

    .venv/bin/python benchmarks/reward_step.py   # writes benchmarks/results/reward_step.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PROMPTS = ROOT.parent / "shared" / "eval" / "prompts_train.txt"
LONG = (
    "Here is a detailed explanation. First, it depends on a few things that matter a lot "
    "in practice, and the details change from case to case. Second, there are some common "
    "rules of thumb that people use, and they usually work well enough for everyday needs."
)
SHORT = "It depends on the case; the common rule of thumb works for everyday needs."


def round_data(prompts: list[str]) -> tuple[list[dict], list[dict]]:
    def messages(prompt: str) -> list[dict]:
        return [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": prompt},
        ]

    pointwise = [
        {"messages": messages(p), "answer": LONG if i % 3 else SHORT, "label": float(i % 3 == 0)}
        for i, p in enumerate(prompts[:22])
    ]
    pairs = [{"messages": messages(p), "chosen": SHORT, "rejected": LONG} for p in prompts[22:32]]
    return pointwise, pairs


def train_once(loaded, settings, pointwise, pairs) -> tuple[float, float]:
    from rlhf_core.reward import RewardModel

    reward = RewardModel.attach(loaded.model, loaded.tokenizer, settings)
    try:
        start = time.perf_counter()
        metrics = reward.train(pointwise, pairs, epochs=1)
        return time.perf_counter() - start, metrics.get("reward/loss", float("nan"))
    finally:
        reward.model.unload()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    parser.add_argument("--model-cache-dir", type=Path, default=Path.home() / ".cache/rlhf-chat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/reward_step.json")
    args = parser.parse_args()

    import torch

    from rlhf_core.modeling import load_base_model
    from rlhf_core.settings import Settings

    torch.manual_seed(0)
    top = Settings(base_model=args.model, model_cache_dir=args.model_cache_dir)
    every = top.model_copy(update={"reward_lora_layers": 0})
    loaded = load_base_model(top)
    prompts = [line.strip() for line in PROMPTS.read_text().splitlines() if line.strip()]
    pointwise, pairs = round_data(prompts)
    train_once(loaded, top, pointwise[:4], [])  # warm-up (allocator, kernels)
    top_s, every_s = [], []
    for i in range(args.repeats):
        every_s.append(train_once(loaded, every, pointwise, pairs)[0])
        top_s.append(train_once(loaded, top, pointwise, pairs)[0])
        print(f"repeat {i}: every layer {every_s[-1]:.1f} s, top "
              f"{top.reward_lora_layers} layers {top_s[-1]:.1f} s", flush=True)  # fmt: skip
    layers = loaded.model.config.get_text_config().num_hidden_layers
    result = {
        "model": args.model,
        "decoder_layers": layers,
        "reward_lora_layers": top.reward_lora_layers,
        "examples": len(pointwise) + len(pairs),
        "top_layers_epoch_s": statistics.median(top_s),
        "every_layer_epoch_s": statistics.median(every_s),
        "speedup": statistics.median([e / t for e, t in zip(every_s, top_s, strict=True)]),
        "command": "python benchmarks/reward_step.py " + " ".join(sys.argv[1:]),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
