"""Sanity rate: does the model still know plain facts? (InstructGPT's "alignment tax")

``shared/eval/prompts_sanity.tsv`` holds plain factual prompts with the words a correct
answer contains (any of them, case-insensitive). The sanity rate is the share of
answers that contain one. :func:`sanity_rate` is what the learning benchmark reports
for every version (learning a style must not cost what the model knew); run this file
to measure the base model at several sampling settings, which is how the app's default
sampling was chosen (see the README):

    nice -n 19 .venv/bin/python benchmarks/sanity.py --model-cache-dir /work/model-cache \\
        --settings 0:1 0.2:0.9 0.7:0.9 --samples 2

(rates, not timings: it need not hold the benchmark lock)
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# ../shared/eval from the project root (a worktree one level deeper finds it too).
SANITY_PROMPTS = next(
    (p / "shared/eval/prompts_sanity.tsv" for p in (ROOT.parent, ROOT.parent.parent)
     if (p / "shared/eval/prompts_sanity.tsv").exists()),
    ROOT.parent / "shared/eval/prompts_sanity.tsv",
)  # fmt: skip


def read_sanity(path: Path = SANITY_PROMPTS) -> list[tuple[str, list[str]]]:
    """(prompt, accepted words) per line; the header line is skipped."""
    items = []
    for line in Path(path).read_text().splitlines()[1:]:
        if line.strip():
            prompt, accept = line.split("\t", 1)
            items.append((prompt.strip(), [w.strip() for w in accept.split("|") if w.strip()]))
    return items


def correct(answer: str, accepted: list[str]) -> bool:
    """True when the answer contains one of the accepted words as a word."""
    text = answer.lower()
    return any(re.search(rf"\b{re.escape(w.lower())}\b", text) for w in accepted)


def sanity_rate(
    model: Any,
    tokenizer: Any,
    items: list[tuple[str, list[str]]],
    *,
    system_prompt: str = "You are a helpful assistant.",
    temperature: float = 0.7,
    top_p: float = 0.9,
    max_new_tokens: int = 32,
    samples: int = 1,
    seed: int = 0,
    batch: int = 16,
) -> dict[str, Any]:
    """The share of answers (``samples`` per prompt) that contain an accepted word, with
    the prompts answered wrongly. Sampled in batches, with the same seed for every model
    (so versions are compared on the same sampling noise); temperature 0 = greedy."""
    import torch

    from rlhf_core.chat_format import prompt_ids
    from rlhf_core.generation import Sampling, generate_kwargs, stop_token_ids

    # The chat encoding and the generate() arguments the app serves with.
    contexts = [
        prompt_ids(tokenizer, [{"role": "system", "content": system_prompt},
                               {"role": "user", "content": p}])
        for p, _ in items
    ]  # fmt: skip
    pad = tokenizer.pad_token_id
    stops = stop_token_ids(model, tokenizer)
    kwargs = generate_kwargs(
        Sampling(temperature, top_p, max_new_tokens), eos_token_id=stops, pad_token_id=pad
    )
    device = getattr(model, "device", "cpu")
    hits, misses, total = 0, [], 0
    for sample in range(samples if temperature > 0 else 1):
        for start in range(0, len(contexts), batch):
            rows = contexts[start : start + batch]
            width = max(len(r) for r in rows)
            input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)
            mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows],
                                device=device)  # fmt: skip
            torch.manual_seed(seed + 1000 * sample + start)
            with torch.inference_mode():
                out = model.generate(input_ids=input_ids, attention_mask=mask, **kwargs)
            for i, row in enumerate(out[:, width:]):
                answer = tokenizer.decode(row, skip_special_tokens=True).strip()
                prompt, accepted = items[start + i]
                total += 1
                if correct(answer, accepted):
                    hits += 1
                else:
                    misses.append({"prompt": prompt, "answer": answer[:200]})
    return {"rate": hits / total if total else 0.0, "answers": total, "misses": misses}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    parser.add_argument("--model-cache-dir", type=Path, default=Path.home() / ".cache/rlhf-chat")
    parser.add_argument("--prompts", type=Path, default=SANITY_PROMPTS)
    parser.add_argument(
        "--settings", nargs="+", default=["0:1", "0.2:0.9", "0.7:0.9"],
        help="temperature:top_p pairs to measure (temperature 0 = greedy)",
    )  # fmt: skip
    parser.add_argument("--samples", type=int, default=2, help="answers per prompt (sampled)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "sanity.json")
    args = parser.parse_args()

    from rlhf_core.modeling import load_base_model
    from rlhf_core.settings import Settings

    loaded = load_base_model(Settings(base_model=args.model, model_cache_dir=args.model_cache_dir))
    items = read_sanity(args.prompts)
    rows = []
    for pair in args.settings:
        temperature, top_p = (float(x) for x in pair.split(":"))
        start = time.perf_counter()
        result = sanity_rate(
            loaded.model, loaded.tokenizer, items, temperature=temperature, top_p=top_p,
            max_new_tokens=args.max_new_tokens, samples=args.samples,
        )  # fmt: skip
        rows.append({"temperature": temperature, "top_p": top_p, **result,
                     "seconds": round(time.perf_counter() - start, 1)})  # fmt: skip
        print(f"temperature {temperature:g} top-p {top_p:g}: sanity {result['rate']:.2f} "
              f"({result['answers']} answers, {rows[-1]['seconds']} s)", flush=True)  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"model": args.model, "prompts": len(items),
                                    "max_new_tokens": args.max_new_tokens, "rows": rows},
                                   indent=2) + "\n")  # fmt: skip


if __name__ == "__main__":
    main()
