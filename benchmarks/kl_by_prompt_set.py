"""Served KL of one published version on three prompt sets, one answer per prompt, same seeds:
the gate's calibration prompts, the learning benchmark's held-out prompts and its training
prompts (32 of each) -- whether the gate's prompts read the KL the benchmark's do.

    python benchmarks/kl_by_prompt_set.py ADAPTER_DIR [MAX_NEW_TOKENS=256] [OUT.json]

(ADAPTER_DIR: a version's ``policy`` folder, e.g. copied from a learning run's data dir.)
"""

import json
import statistics
import sys
from pathlib import Path

import torch
from peft import PeftModel

from rlhf_core.calibration import CALIBRATION_PROMPTS
from rlhf_core.chat_format import prompt_ids
from rlhf_core.generation import Sampling, generate_kwargs, stop_token_ids
from rlhf_core.modeling import load_base_model
from rlhf_core.ppo import token_kl
from rlhf_core.reward import position_ids_from
from rlhf_core.settings import Settings

SHARED_EVAL = Path(__file__).resolve().parents[2] / "shared" / "eval"

adapter = sys.argv[1]
max_new = int(sys.argv[2]) if len(sys.argv) > 2 else 256
settings = Settings(
    base_model="HuggingFaceTB/SmolLM2-135M-Instruct",
    model_cache_dir=Path.home() / ".cache/rlhf-chat",
)
loaded = load_base_model(settings)
tok = loaded.tokenizer
model = PeftModel.from_pretrained(loaded.model, adapter, adapter_name="candidate").eval()
sampling = Sampling(0.7, 0.9, max_new)
sets = {
    "calibration": list(CALIBRATION_PROMPTS)[:32],
    "eval_heldout": (SHARED_EVAL / "prompts_heldout.txt").read_text().splitlines()[:32],
    "train": (SHARED_EVAL / "prompts_train.txt").read_text().splitlines()[:32],
}
out = {}
for name, prompts in sets.items():
    ctx = [
        [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": p},
        ]
        for p in prompts
    ]
    kls, lens = [], []
    for s in range(0, len(ctx), 16):
        rows = [prompt_ids(tok, m) for m in ctx[s : s + 16]]
        w = max(map(len, rows))
        pad = tok.pad_token_id
        ids = torch.tensor([[pad] * (w - len(r)) + r for r in rows])
        pm = torch.tensor([[0] * (w - len(r)) + [1] * len(r) for r in rows])
        stops = stop_token_ids(model, tok)
        torch.manual_seed(s)
        with torch.inference_mode():
            o = model.generate(
                input_ids=ids,
                attention_mask=pm,
                **generate_kwargs(sampling, eos_token_id=stops, pad_token_id=pad),
            )
            resp = o[:, w:]
            is_eos = torch.isin(resp, torch.tensor(stops))
            mask = (~((is_eos.cumsum(1) - is_eos.long()) > 0)).float()
            att = torch.cat([pm, mask.long()], 1)
            f = dict(input_ids=o, attention_mask=att, position_ids=position_ids_from(att))
            lg = model(**f).logits[:, w - 1 : -1]
            with model.disable_adapter():
                rl = model(**f).logits[:, w - 1 : -1]
            kls += (token_kl(lg, rl) * mask).sum(1).tolist()
            lens += mask.sum(1).tolist()
    out[name] = {
        "mean": statistics.mean(kls),
        "sd": statistics.stdev(kls),
        "max": max(kls),
        "tokens": statistics.mean(lens),
        "per_prompt": [round(k, 2) for k in kls],
    }
    print(
        name,
        round(out[name]["mean"], 2),
        "sd",
        round(out[name]["sd"], 2),
        "max",
        round(out[name]["max"], 2),
        "tokens",
        round(out[name]["tokens"], 1),
        flush=True,
    )
json.dump(out, open(sys.argv[3] if len(sys.argv) > 3 else "kl_by_prompt_set.json", "w"), indent=1)
