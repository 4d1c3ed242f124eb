"""One PPO update on a fixed global batch; writes the parameter deltas to a file.

Run it plainly (one process) or with ``accelerate launch --multi_gpu --num_processes 2``
(two gloo processes on the CPU, each with half the batch): tests/test_accelerate.py
checks that both make the same update.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from rlhf_core.modeling import load_base_model  # noqa: E402
from rlhf_core.settings import Settings  # noqa: E402
from rlhf_core.trainer import POLICY_ADAPTER, PPOConfig, PPOTrainer, attach_policy  # noqa: E402

PROMPTS = [[{"role": "user", "content": f"Tell me about item {i}."}] for i in range(4)]
ANSWERS = ["Sure.", "It is a small blue box with a lid.", "No idea, sorry!", "Item three is big."]
FINISHED = [True, False, True, False]


def main(out_file: str) -> None:
    torch.set_num_threads(1)
    cache = Path(os.environ.get("RLHF_TEST_MODEL_CACHE", Path.home() / ".cache/rlhf-chat"))
    settings = Settings(base_model="tiny-random", model_cache_dir=cache, device="cpu")
    base = load_base_model(settings)
    torch.manual_seed(0)
    model, head, _ = attach_policy(base, settings, None)
    with torch.no_grad():  # a non-trivial starting policy and value head, same on every process
        gen = torch.Generator().manual_seed(1)
        for name, p in model.named_parameters():
            if f".{POLICY_ADAPTER}." in name and "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
        head.weight.copy_(torch.randn(head.weight.shape, generator=gen) * 0.1)
    config = PPOConfig(
        batch_size=4,
        ppo_epochs=1,
        max_new_tokens=16,
        learning_rate=1e-2,
        init_kl_coef=0.1,
        target_kl=None,
        early_stop_kl=None,
        score_norm=True,
        answer_limit=32,  # rollouts shorter than served answers: the 2nd and 4th are unfinished
    )

    def reward_fn(prompts, answers):
        return [len(a) / 10.0 for a in answers]

    trainer = PPOTrainer(model, base.tokenizer, config, reward_fn=reward_fn, value_head=head)
    rollout = trainer.rollout_from_texts(
        trainer._shard(PROMPTS), trainer._shard(ANSWERS), finished=trainer._shard(FINISHED)
    )
    exp = trainer.make_experience(rollout, trainer.score(rollout))
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    named += [(f"value_head.{n}", p) for n, p in head.named_parameters()]
    before = {n: p.detach().clone() for n, p in named}
    grads: dict[str, torch.Tensor] = {}
    step = trainer.optimizer.step

    def recording_step(*args, **kwargs):
        # The gradients as the optimiser sees them (after DDP's all-reduce and clipping).
        grads.update({n: p.grad.detach().clone() for n, p in named if p.grad is not None})
        return step(*args, **kwargs)

    trainer.optimizer.step = recording_step
    stats = trainer.update(exp)
    assert stats["ppo/updates"] == 1, stats
    if trainer.accelerator.is_main_process:
        deltas = {n: (p.detach() - before[n]) for n, p in named}
        torch.save(
            {
                "deltas": deltas,
                "grads": grads,
                "stats": stats,
                "world": trainer.world,
                "kl": exp.stats["objective/kl"],
            },
            out_file,
        )
    trainer.accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(sys.argv[1])
