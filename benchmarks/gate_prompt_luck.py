"""Where the gate's reading and the benchmark's held-out KL part: each published version of a
learning run measured again, with the gate's own code (``PPOTrainer.served_kl_samples``, the
run's sampling, seed 0), on

- ``gate_prompts``: the prompts the version's own gate sampled (3 answers each): against the
  in-round reading, the luck of the gate's answers (and of a search that keeps the luckier of
  two samples); also split into its held-out contexts and its calibration prompts;
- ``other_train_heldout``: the held-out contexts of the users' prompt file the gate did not
  sample (3 answers each): against ``gate_prompts``, the luck of the gate's prompts;
- ``eval_heldout``: the benchmark's 32 held-out prompts, one answer each, as the benchmark
  measures them: against ``other_train_heldout``, prompts nobody sent, which no gate sees.

    python benchmarks/gate_prompt_luck.py DATA_DIR GATE_PROMPTS_DIR VERSIONS [OUT.json]

DATA_DIR: the run's ``--data-dir`` (versions in ``adapters/vN-*/policy``); GATE_PROMPTS_DIR: one
JSON file per round, in round order, each the list of contexts the round's gate sampled (or the
pair ``[search, confirmation]``). The trainer does not record them (they are people's messages);
the runs in the README wrote them with the one-line patch kept beside their results
(``gate_prompts_patch.diff``). VERSIONS: ``1,2,3`` (the Nth round published version N).
"""

import glob
import json
import statistics
import sys
from pathlib import Path

import torch
from gate_remeasure import SHARED_EVAL, context, measuring_trainer, served_settings

from rlhf_core.calibration import is_calibration
from rlhf_core.datasets import is_heldout
from rlhf_core.gate import prompt_key
from rlhf_core.generation import Sampling
from rlhf_core.modeling import load_base_model


def main() -> None:
    data, gate_dir = Path(sys.argv[1]), Path(sys.argv[2])
    versions = [int(v) for v in sys.argv[3].split(",")]
    out_file = Path(sys.argv[4]) if len(sys.argv) > 4 else None
    rounds = [json.loads(Path(f).read_text()) for f in sorted(glob.glob(str(gate_dir / "*.json")))]
    settings = served_settings()
    base = load_base_model(settings)
    train = [context(p) for p in (SHARED_EVAL / "prompts_train.txt").read_text().splitlines()]
    train_heldout = [c for c in train if is_heldout(c)]
    eval_heldout = [
        context(p) for p in (SHARED_EVAL / "prompts_heldout.txt").read_text().splitlines()
    ]
    sampling = Sampling.from_settings(settings)
    results = []
    for version in versions:
        adapter = glob.glob(str(data / "adapters" / f"v{version}-*" / "policy"))[0]
        drawn = rounds[version - 1]
        if drawn and isinstance(drawn[0][0], list):  # [search, confirmation]
            drawn = [p for half in drawn for p in half]
        keys = {prompt_key(p) for p in drawn}
        others = [p for p in train_heldout if prompt_key(p) not in keys]
        model, trainer, version_meta = measuring_trainer(base, settings, adapter)
        meta = version_meta.get("metrics", {})
        try:
            row = {
                "version": version,
                "gate_in_round": meta.get("objective/kl_served"),
                "gate_in_round_ucb": meta.get("objective/kl_served_ucb"),
                "gate_base_scale": meta.get("gate/base_scale"),
                "gate_calibration_prompts": sum(is_calibration(p) for p in drawn),
            }
            for name, prompts, answers_each in [
                ("gate_prompts", drawn, 3),
                ("gate_heldout_only", [p for p in drawn if not is_calibration(p)], 3),
                ("gate_calibration_only", [p for p in drawn if is_calibration(p)], 3),
                ("other_train_heldout", others, 3),
                ("eval_heldout", eval_heldout[:32], 1),
            ]:
                if not prompts:
                    continue
                torch.manual_seed(0)
                kl = trainer.served_kl_samples(prompts * answers_each, sampling)[0].tolist()
                row[name] = round(statistics.mean(kl), 2)
                row[name + "_prompts"] = len(prompts)
        finally:
            model.unload()
        print(json.dumps(row), flush=True)
        results.append(row)
    if out_file:
        command = "python benchmarks/gate_prompt_luck.py " + " ".join(sys.argv[1:])
        out_file.write_text(json.dumps({"command": command, "versions": results}, indent=1))


if __name__ == "__main__":
    main()
