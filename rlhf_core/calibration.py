"""Prompts the KL gate may sample on before people have given it enough of its own.

The gate measures a new version's KL to the base on contexts no round trained on (the
held-out contexts, one in five of the store's). A young store has few of them: 5-10 in
the first rounds at 32 votes a round, and a bound over so few prompts describes those
prompts, not serving. Question on 203c79c published a v3 whose gate read 6.75 nats
[bound 8.93] on 10 held-out contexts and which measured 11.85 on the benchmark's 32
held-out prompts; the next round's 14 contexts read 10-12 for the same policy. Until the
store has as many held-out contexts as the gate takes answers, the gate tops them up with
these: ordinary chat requests of many kinds (facts, how-to, code, writing, advice,
opinion, planning), written for this project, in no training set and never sent to PPO,
so they too are prompts the policy has not seen.
"""

from __future__ import annotations

CALIBRATION_PROMPTS: tuple[str, ...] = (
    "Why does bread go stale faster in the fridge?",
    "How do I reverse a string in JavaScript?",
    "Write a limerick about a forgetful robot.",
    "What is the difference between weather and climate?",
    "Give me three tips for a first job interview.",
    "Explain what a hash table is to a beginner.",
    "Summarise the plot of Romeo and Juliet in a few lines.",
    "How can I keep basil alive on a windowsill?",
    "What should I pack for a weekend hike in autumn?",
    "Is it better to rent or buy a home? Give both sides.",
    "Translate 'good morning, how are you?' into French and Spanish.",
    "Write a short thank-you note to a neighbour who watered my plants.",
    "How do vaccines train the immune system?",
    "What is a good way to start learning to play the guitar?",
    "Explain recursion with a simple example.",
    "Describe a thunderstorm from the point of view of a cat.",
    "How many minutes are there in a week? Show the working.",
    "What are the pros and cons of working from home?",
    "Suggest a name for a small bakery by the sea.",
    "How do I remove a red wine stain from a carpet?",
    "What causes the seasons on Earth?",
    "Write a SQL query that counts orders per customer.",
    "Plan a simple vegetarian dinner for four people.",
    "Why do cats purr?",
    "Explain the rule of thirds in photography.",
    "What is inflation, and why do prices rise over time?",
    "Write two sentences that open a mystery story.",
    "How do I politely decline an invitation to a party?",
    "What is the difference between a list and a tuple in Python?",
    "Give me a ten-minute morning stretching routine.",
    "How does a bicycle stay upright when it moves?",
    "Recommend a way to remember people's names after meeting them.",
    "What happened during the fall of the Berlin Wall?",
    "Explain what an API is using a restaurant analogy.",
    "Write a haiku about the first snow of winter.",
    "How should I prepare for a long flight?",
    "What does a project manager do all day?",
    "How do I make a cup of tea properly?",
    "Compare electric cars and petrol cars for city driving.",
    "What is photosynthesis?",
    "Help me write a short bio for a conference talk about gardening.",
    "How can I stop procrastinating on a big assignment?",
    "Explain the Monty Hall problem.",
    "Write a bash command that finds all .log files larger than 10 MB.",
    "What are some fun things to do on a rainy day with kids?",
    "Why is the ocean salty?",
    "Give feedback on this sentence: 'Me and him goes to the shop yesterday.'",
    "What is the best way to store fresh strawberries?",
)

_CALIBRATION_SET = frozenset(CALIBRATION_PROMPTS)


def calibration_context(prompt: str, system_prompt: str) -> list[dict[str, str]]:
    """A calibration prompt as the UI would send it: the default system prompt (when
    there is one), then the user's message."""
    system = [{"role": "system", "content": system_prompt}] if system_prompt.strip() else []
    return [*system, {"role": "user", "content": prompt}]


def is_calibration(context: list[dict[str, str]]) -> bool:
    """Whether a context is one of the calibration prompts (as :func:`calibration_context`
    builds it: one user message, after at most a system prompt)."""
    users = [m for m in context if m["role"] != "system"]
    return len(users) == 1 and users[0]["content"] in _CALIBRATION_SET
