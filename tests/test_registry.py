"""Registry and training lock against a real Valkey server and real PEFT adapters."""

from __future__ import annotations

import copy
import json
import logging
import time
from pathlib import Path

import pytest
import torch

from rlhf_core.modeling import lora_config
from rlhf_core.registry import (
    CHANNEL,
    K_LAST_ROUND,
    LOCK_KEY,
    ROUND_ERROR,
    Registry,
    StaleTokenError,
    TrainingLock,
    UnknownVersionError,
)
from tests.conftest import pubsub_messages, wait_for


def _save_adapter(tiny_model, settings, out: Path, seed: int) -> dict[str, torch.Tensor]:
    """A real LoRA adapter with non-zero B (so versions differ), saved the PEFT way."""
    from peft import get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(copy.deepcopy(tiny_model.model), lora_config(settings))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    model.save_pretrained(out)
    return {k: v.clone() for k, v in model.state_dict().items() if "lora_" in k}


@pytest.fixture()
def adapters(tmp_path, tiny_model, tiny_settings):
    return {
        seed: (
            tmp_path / f"adapter{seed}",
            _save_adapter(tiny_model, tiny_settings, tmp_path / f"adapter{seed}", seed),
        )
        for seed in (1, 2)
    }


def _load(tiny_model, folder: Path):
    """Load the way any other program would: a fresh base + PeftModel.from_pretrained."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model.model_dir)
    return PeftModel.from_pretrained(base, str(folder))


def _lora_equal(model, expected: dict[str, torch.Tensor]) -> bool:
    state = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    assert len(state) == len(expected) > 0
    return all(torch.equal(state[k], expected[k]) for k in expected)


def test_publish_materialize_history(redis_client, tiny_settings, tiny_model, adapters):
    registry = Registry(redis_client, tiny_settings)
    assert registry.current() == 0 and registry.history() == []
    lock = registry.lock()
    token = lock.acquire()
    assert token is not None
    folder1, weights1 = adapters[1]
    folder2, weights2 = adapters[2]
    v1 = registry.publish(
        folder1,
        {"parent": 0, "metrics": {"objective/kl": 0.5}},
        token,
        reward_dir=folder2,
        stream_ids=["1-0", "2-0"],
    )
    v2 = registry.publish(folder2, {"parent": v1, "metrics": {}}, token)
    lock.release()
    assert (v1, v2) == (1, 2) and registry.current() == 2

    meta = registry.get(1)
    assert meta["parent"] == 0 and meta["events_used"] == 2 and meta["fencing_token"] == token
    assert meta["metrics"]["objective/kl"] == 0.5 and meta["storage"] == "inline"
    assert meta["reward_version"] == 1 and registry.get(2)["reward_version"] is None
    assert [h["version"] for h in registry.history()] == [1, 2]
    assert [h["current"] for h in registry.history()] == [False, True]
    assert registry.used_by(["1-0", "2-0", "3-0"]) == {"1-0": 1, "2-0": 1}

    # Unpacked into a fresh cache, the adapters load in an unrelated model.
    path1 = registry.materialize(1, tiny_settings.data_dir / "cache-a")
    assert _lora_equal(_load(tiny_model, path1), weights1)
    assert not _lora_equal(_load(tiny_model, registry.materialize(2)), weights1)
    reward = registry.materialize(1, tiny_settings.data_dir / "cache-a", kind="reward")
    assert _lora_equal(_load(tiny_model, reward), weights2)
    assert registry.materialize(0) is None
    with pytest.raises(UnknownVersionError):
        registry.get(7)


def test_large_adapters_go_to_the_shared_folder(redis_client, tiny_settings, tiny_model, adapters):
    settings = tiny_settings.model_copy(
        update={"inline_artifact_max_mb": 0.0, "artifact_dir": tiny_settings.data_dir / "shared"}
    )
    registry = Registry(redis_client, settings)
    lock = registry.lock()
    token = lock.acquire()
    folder, weights = adapters[1]
    version = registry.publish(folder, {}, token)
    lock.release()
    meta = registry.get(version)
    assert meta["storage"] == "shared"
    assert not redis_client.keys("rlhf:registry:blob:*")  # nothing inline
    path = registry.materialize(version)
    assert path.is_relative_to(settings.data_dir / "shared")
    assert _lora_equal(_load(tiny_model, path), weights)


def test_lock_is_exclusive_and_renewed(redis_client):
    first = TrainingLock(redis_client, ttl_s=0.3)
    second = TrainingLock(redis_client, ttl_s=0.3)
    token = first.acquire()
    assert token == 1
    time.sleep(1.0)  # three leases long: only renewal keeps it
    assert second.acquire() is None
    assert first.holder() == token and not first.lost.is_set()
    first.release()
    assert first.holder() is None
    assert second.acquire() == 2
    second.release()


def test_a_lost_lock_stops_renewing_and_says_so_once(redis_client, caplog):
    """A renewal that finds another round's token sets `lost`, warns once and renews no more
    (so it can never extend the other round's lease); release leaves that lease alone."""
    first = TrainingLock(redis_client, ttl_s=0.3)
    token = first.acquire()
    with caplog.at_level(logging.WARNING, logger="rlhf_core.registry"):
        redis_client.delete(LOCK_KEY)  # as if `first` froze past its lease
        second = TrainingLock(redis_client, ttl_s=30)
        assert second.acquire() == token + 1
        wait_for(first.lost.is_set, 10, "the renewal to notice", interval_s=0.01)
        time.sleep(0.5)  # five more renewal intervals of `first`
    warnings = [r for r in caplog.records if "training lock lost" in r.getMessage()]
    assert len(warnings) == 1, warnings
    first.release()
    assert second.holder() == token + 1
    second.release()


def test_stale_token_cannot_publish(redis_client, tiny_settings, adapters):
    registry = Registry(redis_client, tiny_settings)
    folder, _ = adapters[1]
    old = registry.lock(ttl_s=0.2)
    old_token = old.acquire()
    old._stop_renewing()  # a frozen worker: it stops renewing and its lease runs out
    time.sleep(0.5)
    new = registry.lock(ttl_s=5)
    new_token = new.acquire()
    assert new_token is not None and new_token > old_token
    with pytest.raises(StaleTokenError, match="no longer holds"):
        registry.publish(folder, {}, old_token, stream_ids=["5-0"])
    assert registry.current() == 0 and registry.versions() == []
    assert registry.used_by(["5-0"]) == {}
    assert not redis_client.keys("rlhf:registry:blob:*")  # the staged artifact was dropped
    assert registry.publish(folder, {}, new_token) == 1
    new.release()
    # After release nobody holds the lock: even the last holder's token is refused.
    with pytest.raises(StaleTokenError):
        registry.publish(folder, {}, new_token)
    assert registry.current() == 1


def test_rollback_moves_pointer_and_announces(redis_client, tiny_settings, adapters):
    registry = Registry(redis_client, tiny_settings)
    pubsub = redis_client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(CHANNEL)
    lock = registry.lock()
    token = lock.acquire()
    registry.publish(adapters[1][0], {}, token)
    registry.publish(adapters[2][0], {}, token)
    lock.release()
    assert registry.rollback(1) == 1
    assert registry.current() == 1
    with pytest.raises(UnknownVersionError, match="never published"):
        registry.rollback(5)
    assert registry.current() == 1
    registry.rollback(0)
    assert registry.current() == 0

    messages = pubsub_messages(pubsub, 4)
    pubsub.close()
    assert [(m["version"], m["reason"]) for m in messages] == [
        (1, "publish"),
        (2, "publish"),
        (1, "rollback"),
        (0, "rollback"),
    ]
    assert [m["version"] for m in registry.pointer_log()] == [0, 1, 2, 1]


def test_round_status_and_failures(redis_client, tiny_settings):
    registry = Registry(redis_client, tiny_settings)
    assert registry.progress() is None and registry.last_round() is None
    lock = registry.lock()
    token = lock.acquire()
    registry.set_progress("reward", 0.25, token)
    progress = registry.progress()
    assert progress["stage"] == "reward" and progress["fraction"] == 0.25 and progress["running"]
    lock.release()
    assert registry.progress()["running"] is False  # a dead round does not look alive
    registry.record_failure("KL 12.3 > budget 10", metrics={"objective/kl": 12.3})
    assert registry.last_round()["status"] == "failed"
    assert registry.failures()[0]["metrics"]["objective/kl"] == 12.3
    assert "last round failed: KL 12.3 > budget 10" in registry.status_line()


def test_a_failures_exception_text_stays_out_of_the_public_status_line(redis_client, tiny_settings):
    registry = Registry(redis_client, tiny_settings)
    registry.record_failure(ROUND_ERROR, "ConnectionError: 10.0.0.5:6379 refused")
    assert "last round failed: an error stopped it" in registry.status_line()
    assert "10.0.0.5" not in registry.status_line()
    assert "failed: ConnectionError: 10.0.0.5:6379" in registry.status_line(public=False)
    # A record from before reasons and details were kept apart may carry either.
    old = {"status": "failed", "reason": "OSError: /data/artifacts/x", "at": time.time()}
    redis_client.set(K_LAST_ROUND, json.dumps(old))
    assert "/data" not in registry.status_line() and ROUND_ERROR in registry.status_line()
    assert "/data/artifacts/x" in registry.status_line(public=False)


def test_cli_versions_rollback_status(redis_client, tiny_settings, adapters):
    import subprocess
    import sys

    from tests.conftest import tiny_env

    registry = Registry(redis_client, tiny_settings)
    lock = registry.lock()
    token = lock.acquire()
    registry.publish(adapters[1][0], {"parent": 0, "metrics": {"reward/accuracy": 0.75}}, token)
    lock.release()
    registry.record_failure("KL 12.3 > budget 10")

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "chat_ui", *args], env=tiny_env(tiny_settings),
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip

    rows = json.loads(cli("versions", "--json").stdout)
    assert [(r["version"], r["current"]) for r in rows] == [(0, ""), (1, "✓")]
    assert rows[1]["reward accuracy"] == 0.75
    assert "last round failed: KL 12.3 > budget 10" in cli("status").stdout
    done = cli("rollback", "0")
    assert done.returncode == 0 and registry.current() == 0
    refused = cli("rollback", "9")
    assert refused.returncode == 2 and "never published" in refused.stderr
    assert registry.current() == 0


def test_reward_models_are_versioned_on_their_own(
    redis_client, tiny_settings, tiny_model, adapters, tmp_path
):
    """Issue 9 defect 5: a round whose policy is refused keeps its reward model, so the
    reward model has its own counter and pointer, beside the policy versions."""
    registry = Registry(redis_client, tiny_settings)
    assert registry.current_reward() == 0 and registry.materialize_reward(0) is None
    (folder1, weights1), (folder2, _) = adapters[1], adapters[2]
    lock = registry.lock()
    token = lock.acquire()
    assert registry.publish_reward(folder1, {"policy_refused": "KL 12 > budget 10"}, token) == 1
    assert registry.publish_reward(folder2, {}, token) == 2
    assert registry.current_reward() == 2 and registry.reward_versions() == [1, 2]
    assert registry.versions() == [] and registry.current() == 0  # no policy version
    assert registry.get_reward(1)["policy_refused"] == "KL 12 > budget 10"
    path = registry.materialize_reward(1, tmp_path / "cache")
    assert _lora_equal(_load(tiny_model, path), weights1)
    lock.release()
    with pytest.raises(StaleTokenError):
        registry.publish_reward(folder1, {}, token)
    assert registry.current_reward() == 2
    registry.set_trainer_state({"kl_ctl": {"value": 0.07}})
    assert registry.trainer_state() == {"kl_ctl": {"value": 0.07}}


def test_status_says_when_the_kl_budget_is_reached(redis_client, tiny_settings):
    registry = Registry(redis_client, tiny_settings)
    registry.record_failure("KL 11 (95% bound) > budget 10", kl_budget_reached=True)
    assert "KL budget reached: KL 11 (95% bound) > budget 10" in registry.status_line()
