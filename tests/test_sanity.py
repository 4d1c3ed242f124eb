"""benchmarks/sanity.py: the sanity rate the learning benchmark reports per version."""

from __future__ import annotations

import pytest

from benchmarks.sanity import SANITY_PROMPTS, correct, read_sanity, sanity_rate


@pytest.mark.skipif(
    not SANITY_PROMPTS.exists(),
    reason=f"{SANITY_PROMPTS} is not here: the evaluation prompts live in ../shared/eval/ "
    "beside the project's checkout, not in the repository (a clone elsewhere lacks them)",
)
def test_the_sanity_prompts_are_read():
    items = read_sanity(SANITY_PROMPTS)
    assert len(items) == 30 and items[0] == ("What is the capital of France?", ["Paris"])


def test_what_counts_as_correct():
    assert correct("The capital of France is Paris.", ["Paris"])
    assert correct("paris, of course", ["Paris"])
    assert not correct("La capitale est Parisienne", ["Paris"])  # a word, not a substring
    assert correct("It has 8 legs.", ["8", "eight"]) and not correct("It has 18 legs", ["8"])


def test_sanity_rate_counts_answers_and_misses(tiny_model):
    items = [("What is the capital of France?", ["Paris"]), ("Say hi.", ["zzzz-never"])]
    out = sanity_rate(
        tiny_model.model, tiny_model.tokenizer, items, temperature=0.0, max_new_tokens=4
    )
    assert out["answers"] == 2 and len(out["misses"]) >= 1 and 0.0 <= out["rate"] <= 0.5
    sampled = sanity_rate(
        tiny_model.model, tiny_model.tokenizer, items, temperature=0.7, max_new_tokens=4,
        samples=2,
    )  # fmt: skip
    assert sampled["answers"] == 4
