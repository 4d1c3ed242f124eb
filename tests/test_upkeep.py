"""Upkeep: a dead round is noticed and re-queued once, stored adapters are capped, a
corrupt adapter does not stop later swaps, the model is built once under a lock."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import pytest

from chat_ui.training import VersionWatcher
from rlhf_core.modeling import _build_lock, _build_tiny_random, load_base_model
from rlhf_core.registry import Registry, UnknownVersionError
from rlhf_core.serving import PolicyServer
from rlhf_core.upkeep import abandoned_round, kept_versions, prune_adapters, request_due_round
from tests.conftest import wait_for
from tests.test_registry import _save_adapter


def publish(registry: Registry, folder: Path, **meta) -> int:
    lock = registry.lock()
    token = lock.acquire()
    try:
        return registry.publish(folder, meta, token)
    finally:
        lock.release()


def test_a_killed_round_is_requeued_once_after_its_lease(tiny_settings, redis_client):
    settings = tiny_settings.model_copy(update={"train_every": 1000})
    registry = Registry(redis_client, settings)
    lock = registry.lock(ttl_s=0.5)
    token = lock.acquire()
    registry.set_progress("training", 0.4, token)
    sent: list[str] = []
    assert request_due_round(settings, redis_client, sent.append) is None  # still running
    lock._stop_renewing()  # the worker dies: nobody renews the lease
    time.sleep(0.7)
    assert abandoned_round(registry)["stage"] == "training"
    reason = request_due_round(settings, redis_client, sent.append)
    assert reason and "re-run of round" in reason and sent == [reason]
    # A second checker (another worker) does not queue it again.
    assert request_due_round(settings, redis_client, sent.append) is None and len(sent) == 1
    # Once a round records an outcome, nothing is due any more.
    registry.clear_round_request()
    registry.record_round("skipped", "no new feedback")
    assert abandoned_round(registry) is None
    assert request_due_round(settings, redis_client, sent.append) is None


def test_finished_rounds_are_not_requeued(tiny_settings, redis_client):
    registry = Registry(redis_client, tiny_settings)
    for stage, outcome in (("published", None), ("rejected", None), ("gate", "failed")):
        lock = registry.lock()
        token = lock.acquire()
        registry.set_progress(stage, 1.0, token)
        if outcome:
            registry.record_round(outcome, "KL too high")
        lock.release()
        assert abandoned_round(registry) is None, stage


@pytest.fixture()
def folders(tmp_path, tiny_model, tiny_settings):
    return [_save_adapter(tiny_model, tiny_settings, tmp_path / f"a{i}", i) and tmp_path / f"a{i}"
            for i in range(1, 3)]  # fmt: skip


def test_adapters_beyond_the_cap_are_pruned_and_cannot_be_rolled_back_to(
    tiny_settings, redis_client, folders
):
    settings = tiny_settings.model_copy(update={"keep_adapters": 2})
    registry = Registry(redis_client, settings)
    for i in range(4):
        publish(registry, folders[i % 2], parent=i)
    registry.rollback(2)  # the current version is kept whatever its age
    assert kept_versions(registry, 2) == {2, 3, 4}
    assert prune_adapters(settings, redis_client) == [1]
    assert prune_adapters(settings, redis_client) == []  # idempotent
    assert not redis_client.keys("rlhf:registry:blob:" + registry.get(1)["artifact"] + "*")
    with pytest.raises(UnknownVersionError, match="RLHF_KEEP_ADAPTERS"):
        registry.rollback(1)
    with pytest.raises(FileNotFoundError, match="RLHF_KEEP_ADAPTERS"):
        registry.materialize(1)
    assert registry.get(1)["version"] == 1  # the metadata stays
    assert registry.materialize(2) is not None and registry.rollback(4) == 4


def test_a_rollback_while_pruning_never_leaves_current_without_weights(
    tiny_settings, redis_client, folders, monkeypatch
):
    """Review 2 of s11: the pruner chose what to keep once, then deleted the rest; a
    rollback to an old version in between made it current and then deleted its weights
    (every UI then failed to load it, and every round failed to load its parent)."""
    from rlhf_core import upkeep

    settings = tiny_settings.model_copy(update={"keep_adapters": 2})
    registry = Registry(redis_client, settings)
    for i in range(4):
        publish(registry, folders[i % 2], parent=i)
    chosen = upkeep.kept_versions

    def admin_rolls_back_meanwhile(registry_, keep):
        kept = chosen(registry_, keep)
        registry.rollback(1)  # after the pruner decided that 1 goes
        return kept

    monkeypatch.setattr(upkeep, "kept_versions", admin_rolls_back_meanwhile)
    assert prune_adapters(settings, redis_client) == [2]  # 1 is current now: left alone
    assert registry.current() == 1 and registry.materialize(1) is not None
    monkeypatch.undo()
    registry.rollback(4)
    assert prune_adapters(settings, redis_client) == [1]
    with pytest.raises(UnknownVersionError, match="RLHF_KEEP_ADAPTERS"):
        registry.start_candidate(1, 0.5)


def test_a_corrupt_adapter_does_not_stop_later_swaps(tiny_settings, redis_client, folders):
    """The watcher thread died on anything but Redis/OS/ValueError errors: a corrupt
    safetensors file stopped every later swap until a restart."""
    settings = tiny_settings.model_copy(update={"version_poll_s": 0.2})
    registry = Registry(redis_client, settings)
    corrupt = folders[0].with_name("corrupt")
    shutil.copytree(folders[0], corrupt)
    (corrupt / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    server = PolicyServer(load_base_model(settings), settings)
    watcher = VersionWatcher(server, settings, client=redis_client).start()
    try:
        publish(registry, corrupt)
        error = wait_for(lambda: watcher.last_error, 20, "the watcher to report an error",
                         interval_s=0.1)  # fmt: skip
        assert "version 1 cannot be served" in error
        assert server.current_version == 0 and watcher._thread.is_alive()
        text = server.generate([{"role": "user", "content": "hi"}], {"max_new_tokens": 3}).text
        assert isinstance(text, str)  # still serving
        publish(registry, folders[1])
        # Both: the watcher clears last_error just after the swap, not with it.
        wait_for(lambda: server.current_version == 2 and watcher.last_error is None, 40,
                 "version 2 served and the error cleared", interval_s=0.1)  # fmt: skip
    finally:
        watcher.stop()


def test_a_candidate_that_fails_to_load_does_not_leave_the_last_one_served(
    tiny_settings, redis_client, folders
):
    """Review 2 of s11: when the next candidate's adapter failed to load, the watcher kept
    the one before it, which had just been rolled back, for the canary's share of users."""
    from rlhf_core import canary

    registry = Registry(redis_client, tiny_settings)
    corrupt = folders[0].with_name("corrupt")
    shutil.copytree(folders[0], corrupt)
    (corrupt / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    lock = registry.lock()
    token = lock.acquire()
    try:
        registry.publish(folders[0], {"parent": 0}, token)  # v1 current
        registry.publish(folders[1], {"parent": 1}, token, canary_share=0.5)  # v2 candidate
        registry.publish(corrupt, {"parent": 1}, token, canary_share=0.5)  # v3 waits
    finally:
        lock.release()
    server = PolicyServer(load_base_model(tiny_settings), tiny_settings)
    watcher = VersionWatcher(server, tiny_settings, client=redis_client)
    watcher._safe_sync()
    users = [f"user-{n}" for n in range(40)]
    assert {watcher.version_for(u) for u in users} == {2, None}  # the share gets v2
    canary.override(redis_client, tiny_settings, "rollback", by="test")  # v3 is next
    assert registry.candidate()["version"] == 3
    watcher._safe_sync()
    assert "cannot be served" in watcher.last_error
    assert {watcher.version_for(u) for u in users} == {None}  # nobody gets v2 any more
    server.close()


def test_the_model_is_built_once_and_the_other_process_waits(tmp_path, model_cache):
    """The UI and the worker of a first `make run` both converted the GGUF into one folder."""
    from rlhf_core.settings import Settings

    out = tmp_path / "tiny-random"
    settings = Settings(model_cache_dir=model_cache)
    result: list[Path] = []
    with _build_lock(out):
        waiter = threading.Thread(target=lambda: result.append(_build_tiny_random(out, settings)))
        waiter.start()
        time.sleep(1.0)
        assert waiter.is_alive() and not result  # waiting for us
        shutil.copytree(model_cache / "tiny-random", out)  # what "we" built
        built_at = (out / "config.json").stat().st_mtime
    waiter.join(timeout=60)
    assert result == [out] and (out / "config.json").stat().st_mtime == built_at  # not rebuilt


def test_rolled_back_candidates_do_not_pile_up_in_the_served_model(
    tiny_settings, redis_client, folders
):
    """Review c: a candidate rolled back by the canary stayed loaded (its adapter slot, a new
    one built under the model lock once the spares ran out): versions are unloaded only when
    the current one changes, and a canary that keeps rejecting candidates never changes it.
    Ten rejected candidates left ten adapters in the model of every UI."""
    from rlhf_core import canary

    registry = Registry(redis_client, tiny_settings)
    lock = registry.lock()
    token = lock.acquire()
    try:
        registry.publish(folders[0], {"parent": 0}, token)  # v1 current
    finally:
        lock.release()
    server = PolicyServer(load_base_model(tiny_settings), tiny_settings)
    watcher = VersionWatcher(server, tiny_settings, client=redis_client)
    watcher._safe_sync()
    try:
        for n in range(10):
            token = lock.acquire()
            try:
                version = registry.publish(folders[n % 2], {"parent": 1}, token, canary_share=0.5)
            finally:
                lock.release()
            watcher._safe_sync()
            assert watcher.candidate["version"] == version and watcher.last_error is None
            canary.override(redis_client, tiny_settings, "rollback", by="test")
            watcher._safe_sync()
            assert watcher.candidate is None and server.current_version == 1
        slots = [name for name in server.model.peft_config]
        assert len(server.loaded_versions) <= 1 + server.keep_versions + 1, server.loaded_versions
        assert len(slots) <= 2 * server.keep_versions + 2, slots
        text = server.generate([{"role": "user", "content": "hi"}], {"max_new_tokens": 3}).text
        assert isinstance(text, str)
    finally:
        server.close()
