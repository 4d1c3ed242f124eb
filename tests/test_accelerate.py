"""The trainer under ``accelerate launch`` with two gloo processes on the CPU makes the
same update as one process on the same global batch."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "accelerate_step.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(model_cache: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "RLHF_TEST_MODEL_CACHE": str(model_cache),
            "OMP_NUM_THREADS": "1",
            "HF_HUB_OFFLINE": "1",
            "PYTHONPATH": str(ROOT),
        }
    )
    return env


def test_two_process_update_matches_the_single_process_update(tiny_model, model_cache, tmp_path):
    single, double = tmp_path / "single.pt", tmp_path / "double.pt"
    subprocess.run(
        [sys.executable, str(SCRIPT), str(single)],
        check=True,
        cwd=ROOT,
        env=_env(model_cache),
        timeout=300,
    )
    accelerate = Path(sys.executable).with_name("accelerate")
    # --multi_gpu with no GPU starts gloo processes on the CPU (--cpu would start one).
    subprocess.run(
        [
            str(accelerate),
            "launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "--main_process_port",
            str(_free_port()),
            str(SCRIPT),
            str(double),
        ],
        check=True,
        cwd=ROOT,
        env=_env(model_cache),
        timeout=300,
    )
    one, two = torch.load(single), torch.load(double)
    assert one["world"] == 1 and two["world"] == 2
    assert abs(one["kl"] - two["kl"]) < 1e-4
    assert one["deltas"].keys() == two["deltas"].keys()
    # The same gradients (what DDP must guarantee), to float rounding relative to each
    # tensor's largest entry. Adam's first step is about lr * g / (|g| + eps), which turns
    # the rounding of a gradient near eps into a step difference of a few % of lr, so the
    # steps themselves are compared on average and the largest entry only loosely.
    assert one["grads"].keys() == two["grads"].keys() and one["grads"]
    for name, grad in one["grads"].items():
        scale = float(grad.abs().max()) + 1e-12
        assert float((grad - two["grads"][name]).abs().max()) < 1e-4 * scale, name
    lr = 1e-2
    for name, delta in one["deltas"].items():
        other = two["deltas"][name]
        diff = (delta - other).abs()
        assert float(diff.max()) < 5e-2 * lr, (name, float(diff.max()))
        assert float(diff.mean()) < 1e-3 * lr, (name, float(diff.mean()))
        assert float(delta.abs().max()) > 0.5 * lr  # it was really updated
    for key in ("loss/policy", "loss/value", "policy/approx_kl"):
        assert abs(one["stats"][key] - two["stats"][key]) < 1e-4, key
