"""Words and EOS of the answers served so far, by policy version, read from the store of a
running `benchmarks/learning.py` (how the two diagnostic runs in this folder were read
before they were stopped).

    .venv/bin/python peek_store.py /tmp/rlhf-learning-XXXX
"""

import collections
import json
import re
import sys

import redis

data_dir = sys.argv[1]
with open(data_dir + "/redis.url") as f:
    client = redis.Redis.from_url(f.read().split()[0])
by_version = collections.defaultdict(list)
for key in client.scan_iter("*turn:*", count=1000):
    try:
        turn = json.loads(client.get(key))
    except (TypeError, ValueError):
        continue  # not a turn record
    if isinstance(turn, dict) and "answer" in turn:
        by_version[turn.get("policy_version")].append(turn)
for version, turns in sorted(by_version.items(), key=lambda item: str(item[0])):
    words = [len(re.findall(r"\S+", t["answer"])) for t in turns]
    finished = sum(1 for t in turns if t.get("finished"))
    print(
        f"v{version}: {len(turns)} answers, mean {sum(words) / len(words):.1f} words, "
        f"{finished} finished with EOS"
    )
