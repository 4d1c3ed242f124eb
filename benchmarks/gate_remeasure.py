"""Measure a published version again with the gate's own code (``PPOTrainer.served_kl_samples``)
on the held-out split of the benchmark's training prompts (the contexts ``datasets.is_heldout``
keeps out of training: the ones the gate draws its prompts from), at the version's scale and at
the other scales its round's search tried -- whether the gate's in-round reading is what the
same weights give on that prompt population.

    python benchmarks/gate_remeasure.py ADAPTER_DIR [SCALE_TRIED_IN_ROUND ...]

(ADAPTER_DIR: a version's ``policy`` folder from a learning run's data dir; the scales as the
round's ``gate/try*_scale``, relative to the full step: the published adapter is at
``gate/base_scale``.) Serving as the learning benchmark's users: T 0.7, top-p 0.9, 64 tokens.
"""

import statistics
import sys
from pathlib import Path

import torch

from rlhf_core.datasets import is_heldout
from rlhf_core.generation import Sampling
from rlhf_core.modeling import load_base_model
from rlhf_core.reward import adapter_named_parameters
from rlhf_core.settings import Settings
from rlhf_core.trainer import PPOConfig, PPOTrainer, attach_policy

SHARED_EVAL = Path(__file__).resolve().parents[2] / "shared" / "eval"


def served_settings() -> Settings:
    """The learning benchmark's users' serving: SmolLM2, T 0.7, top-p 0.9, 64 tokens."""
    return Settings(
        base_model="HuggingFaceTB/SmolLM2-135M-Instruct",
        model_cache_dir=Path.home() / ".cache/rlhf-chat",
        max_new_tokens=64,
        temperature=0.7,
        top_p=0.9,
    )


def measuring_trainer(base, settings: Settings, adapter: str | None):
    """``(model, trainer, meta)``: the version in ``adapter`` attached to ``base`` as the
    trainer attaches a round's policy, in eval mode, for ``served_kl_samples`` (the caller
    unloads the model)."""
    model, head, meta = attach_policy(base, settings, adapter)
    trainer = PPOTrainer(
        model,
        base.tokenizer,
        PPOConfig.from_settings(settings),
        reward_fn=lambda prompts, answers: [0.0] * len(answers),
        value_head=head,
    )
    model.eval()
    return model, trainer, meta


def context(prompt: str) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": prompt},
    ]


def main() -> None:
    settings = served_settings()
    model, trainer, meta = measuring_trainer(load_base_model(settings), settings, sys.argv[1])
    prompts = [context(p) for p in (SHARED_EVAL / "prompts_train.txt").read_text().splitlines()]
    heldout = [c for c in prompts if is_heldout(c)]
    sampling = Sampling.from_settings(settings)
    metrics = meta.get("metrics", {})
    published = float(metrics.get("gate/base_scale", 1.0))
    gate, bound = metrics.get("objective/kl_served"), metrics.get("objective/kl_served_ucb")
    print(f"{len(heldout)} held-out contexts; in-round gate: {gate:.2f} [{bound:.2f}] at scale "
          f"{published:.4f}")  # fmt: skip
    lora_b = [(p, p.detach().clone()) for n, p in adapter_named_parameters(model, "policy")
              if ".lora_B." in n]  # fmt: skip
    for scale in [published, *map(float, sys.argv[2:])]:
        with torch.no_grad():
            for param, saved in lora_b:
                param.copy_(saved * (scale / published))
        torch.manual_seed(0)
        kl = trainer.served_kl_samples(heldout + heldout, sampling)[0].tolist()
        print(f"scale {scale:.4f}: {statistics.mean(kl):.2f} nats (sd {statistics.stdev(kl):.2f}, "
              f"{len(kl)} answers)")  # fmt: skip


if __name__ == "__main__":
    main()
