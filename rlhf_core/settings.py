"""One typed settings object for every process (UI, worker, CLI, benchmarks).

Every field is read from the environment with the prefix ``RLHF_`` (for example
``RLHF_BASE_MODEL``), so a UI replica and a GPU worker on two machines agree by
sharing the same environment. The README's settings table lists them all.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
TINY_MODEL = "tiny-random"
# Settings no longer read, and what to set instead: an operator who still sets one must
# hear of it, not run silently on a default (unknown RLHF_ variables are ignored).
RETIRED_SETTINGS = {
    "RLHF_KL_ERROR_CLIP": "it was split into RLHF_KL_RISE_CLIP (default 0.2) and "
    "RLHF_KL_FALL_CLIP (default 0.5); set those instead and unset RLHF_KL_ERROR_CLIP.",
}


def _optional(annotation: Any) -> bool:
    return type(None) in getattr(annotation, "__args__", ())


class SettingsError(ValueError):
    """Some RLHF_* value cannot be used; the message names each one and what to do."""


def _describe(error: ValidationError) -> str:
    lines = []
    for problem in error.errors():
        name = "RLHF_" + "_".join(str(part) for part in problem["loc"]).upper()
        value = problem.get("input")
        # A value check of the whole object (a retired setting) has no field of its own.
        where = f"{name}={value!r}" if problem["loc"] else "settings"
        lines.append(f"  {where}: {problem['msg']}")
    return (
        "Some RLHF_ settings cannot be used:\n"
        + "\n".join(lines)
        + "\nFix or unset them; the README's settings table says what each one takes."
    )


class Settings(BaseSettings):
    # Not a number or infinite is never a meaningful setting: refuse it like any bad value.
    model_config = SettingsConfigDict(env_prefix="RLHF_", extra="ignore", allow_inf_nan=False)

    def __init__(self, **values: Any) -> None:
        # Every process reads its settings first; pydantic's own error is a traceback
        # that names the field, not the variable an operator set.
        try:
            super().__init__(**values)
        except ValidationError as error:
            raise SettingsError(_describe(error)) from None

    # --- model -------------------------------------------------------------
    base_model: str = Field(
        DEFAULT_MODEL,
        description="Hub id or local folder of the base causal LM; 'tiny-random' for tests.",
    )
    device: str = Field(
        "auto",
        pattern=r"^(auto|cpu|cuda(:[0-9]+)?)$",
        description="'auto' (cuda when present), 'cpu' or 'cuda'.",
    )

    # --- storage -----------------------------------------------------------
    redis_url: str | None = Field(
        None,
        # What redis-py's from_url takes; others failed later, in a traceback.
        pattern=r"^(redis|rediss|unix)://",
        description="Redis/Valkey URL shared by all processes; unset = embedded Valkey.",
    )
    data_dir: Path = Field(
        Path(".rlhf-data"),
        description="Embedded server's append-only files, model cache, artifacts.",
    )
    model_cache_dir: Path | None = Field(
        None, description="Where converted/built base models are cached; unset = data_dir/models."
    )
    artifact_dir: Path | None = Field(
        None,
        description="Folder shared by all machines for large adapters; unset = data_dir/artifacts.",
    )
    inline_artifact_max_mb: float = Field(
        32.0, ge=0, description="Adapters up to this size are stored in Redis itself."
    )

    # --- web UI ------------------------------------------------------------
    host: str = Field("127.0.0.1", description="Address the chat UI listens on.")
    port: int = Field(7860, ge=1, le=65535, description="Port of the chat UI.")
    max_input_chars: int = Field(4000, ge=1, description="Longest user message accepted.")
    max_system_prompt_chars: int = Field(
        4000, ge=1, description="Longest system prompt accepted from the page."
    )
    max_context_tokens: int = Field(
        1536, ge=1, description="Prompt budget; older turns are trimmed beyond it."
    )
    system_prompt: str = Field("You are a helpful assistant.", description="Default system prompt.")
    temperature: float = Field(
        0.2,
        ge=0,
        le=2,
        description="Default sampling temperature (0 = greedy); chosen on the sanity prompts.",
    )
    top_p: float = Field(0.9, gt=0, le=1, description="Default nucleus sampling top-p.")
    max_new_tokens: int = Field(256, ge=1, description="Default answer length limit, in tokens.")
    version_poll_s: float = Field(
        2.0,
        gt=0,
        description="How often a UI checks the registry in case a pub/sub message was missed.",
    )
    session_idle_s: float = Field(
        3600.0,
        gt=0,
        description="A chat session nobody has touched this long (an open tab polls, a closed "
        "one does not) is dropped from memory, after its unsaved answers are saved.",
    )
    serving_backend: Literal["batched", "sequential", "vllm"] = Field(
        "batched",
        description="'batched': answers share one continuous-batching decode loop; "
        "'sequential': one answer at a time (the old path, kept for comparison); "
        "'vllm': stream from the vLLM server at RLHF_VLLM_URL.",
    )
    max_batch_size: int = Field(
        16, ge=1, description="Most answers decoded together in the batched server; more wait."
    )
    vllm_url: str | None = Field(
        None,
        description="Base URL of a vLLM OpenAI-compatible server (with --enable-lora and "
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING=1), used when RLHF_SERVING_BACKEND=vllm.",
    )
    redis_timeout_s: float = Field(
        2.0,
        gt=0,
        description="Socket timeout for Redis calls from the UI (a clear error, not a hang).",
    )

    # --- who may do what (chat_ui/access.py; README "Running it in public") ----
    public: bool | None = Field(
        None,
        description="Treat visitors as strangers (sign-in, limits, no anonymous training); "
        "unset = yes unless the UI listens on a loopback address.",
    )
    auth: Literal["auto", "none", "hf", "header", "gradio"] = Field(
        "auto",
        description="How people sign in: 'hf' (Hugging Face OAuth, the default on a Space; "
        "refused on a public UI off a Space, where Gradio fakes the sign-in), "
        "'header' (a trusted reverse proxy sets RLHF_AUTH_HEADER), 'gradio' (RLHF_AUTH_USERS), "
        "'none'; 'auto' = hf on a Space, else none.",
    )
    auth_header: str = Field(
        "X-Forwarded-User",
        description="With auth=header: the header that the reverse proxy sets to the account "
        "name (the proxy must drop any copy a client sends).",
    )
    auth_users: str = Field(
        "", description="With auth=gradio: 'name:password' pairs, comma-separated."
    )
    admins: str = Field(
        "",
        description="Comma-separated accounts that may train, roll back and change settings; "
        "unset = the local user when the UI listens on loopback, nobody otherwise.",
    )
    anonymous_chat: bool = Field(True, description="People who are not signed in may chat.")
    anonymous_train: bool | None = Field(
        None,
        description="Feedback of people who are not signed in trains the model; "
        "unset = yes unless public.",
    )
    training_tab: Literal["readonly", "hidden"] = Field(
        "readonly", description="What people who are not admins see of the Training tab."
    )
    client_ip_header: str = Field(
        "",
        description="Header whose last address is the visitor's IP (a proxy's X-Forwarded-For); "
        "unset = X-Forwarded-For on a Space, else the TCP peer.",
    )
    session_secret: str = Field(
        "",
        description="Key that signs session cookies; unset = a random one kept in Redis "
        "(shared by every UI replica).",
    )
    message_rate: str = Field(
        "20/minute;300/day",
        description="Messages (send, regenerate; an arena message counts two) per account "
        "('limits' syntax).",
    )
    message_rate_ip: str = Field("60/minute", description="Messages per IP address.")
    feedback_rate: str = Field(
        "60/minute;2000/day", description="Reactions (vote, rewrite, undo) per account."
    )
    feedback_rate_ip: str = Field("240/minute", description="Reactions per IP address.")
    session_rate_ip: str = Field(
        "60/minute;1000/hour",
        description="New chats per IP address (each page load opens one; a chat id the "
        "server has not seen is bound to its browser only within this window).",
    )
    answers_in_flight: int = Field(
        4,
        ge=0,
        description="Answers one address (an IPv6 /64) or one account may have the server "
        "writing at once, in each UI process: each holds one of its RLHF_MAX_BATCH_SIZE decode "
        "slots, and new chats are cheap. 0 = no limit. Admins are not counted.",
    )
    max_body_kb: int = Field(256, ge=1, description="Largest HTTP request body accepted, in KiB.")
    max_queue: int = Field(
        64,
        ge=1,
        description="Requests that may wait in the queue; beyond it people are told to retry.",
    )

    # --- training ----------------------------------------------------------
    train_every: int = Field(
        16, ge=1, description="New feedback events that start a training round."
    )
    max_events_per_user: int = Field(
        8,
        ge=1,
        description="Per-user cap: one user's events train at most this many a round on average "
        "over RLHF_USER_WINDOW_ROUNDS rounds; events over it are consumed untrained.",
    )
    user_window_rounds: int = Field(
        4,
        ge=1,
        description="Window of the per-user cap, in rounds that trained (this one included): a "
        "user trains at most RLHF_MAX_EVENTS_PER_USER x this many events in any such window.",
    )
    # --- privacy and poisoning defences (rlhf_core/privacy.py) -------------
    review_rewrites: bool = Field(
        False,
        description="Rewrites train only after an admin approves them in the Training tab "
        "(dropped ones never train).",
    )
    new_account_hold_s: float = Field(
        0.0,
        ge=0,
        description="Feedback of an account younger than this many seconds is held back "
        "until the account is that old (0 = off).",
    )
    retention_days: float | None = Field(
        None,
        gt=0,
        description="Turns and their events older than this are deleted (never ones still "
        "waiting to train); unset = kept.",
    )
    lora_r: int = Field(16, ge=1, description="LoRA rank of the policy and reward adapters.")
    lora_alpha: int = Field(32, gt=0, description="LoRA alpha.")
    learning_rate: float = Field(3e-4, gt=0, description="Policy learning rate.")
    reward_learning_rate: float = Field(3e-4, gt=0, description="Reward-model learning rate.")
    reward_lora_layers: int = Field(
        8,
        ge=0,
        description="The reward adapter sits on the top this-many decoder layers (0 = all): "
        "its backward pass stops there, which makes reward training about 2x faster.",
    )
    reward_epochs: int = Field(
        2,
        ge=0,
        description="Passes over the new reward data per round (replayed older data: one).",
    )
    ppo_steps: int = Field(4, ge=0, description="PPO rollout+update steps per round.")
    ppo_batch_size: int = Field(8, ge=1, description="Prompts per PPO rollout.")
    ppo_epochs: int = Field(4, ge=1, description="Optimisation epochs over each rollout.")
    ppo_micro_batch_size: int | None = Field(
        4, ge=1, description="Answers per forward/backward (gradient accumulation; bounds memory)."
    )
    ppo_new_tokens: int = Field(64, ge=1, description="Tokens sampled per rollout answer.")
    init_kl_coef: float = Field(
        0.2,
        ge=0,
        description="Initial KL penalty coefficient, against normalised (unit-variance) scores: "
        "their KL-regularised optimum pi_base*exp(score/coef) lies 1/(2 coef^2) nats from the "
        "base, 12.5 at 0.2 (200 at 0.05, which let rounds drift until the gate refused them).",
    )
    target_kl: float | None = Field(
        6.0,
        gt=0,
        description="Adaptive KL target per answer (nats); empty (RLHF_TARGET_KL=) = fixed "
        "coefficient.",
    )
    kl_horizon: float | None = Field(
        None,
        gt=0,
        description="Samples over which the adaptive KL coefficient moves by up to "
        "RLHF_KL_RISE_CLIP up or RLHF_KL_FALL_CLIP down (Ziegler et al. 2019); unset = one "
        "round's samples (PPO steps x batch size).",
    )
    kl_rise_clip: float = Field(
        0.2,
        gt=0,
        lt=1,
        description="The adaptive KL coefficient rises by up to this fraction per horizon (its "
        "error KL/target - 1 is clipped to at most this; Ziegler et al.: 0.2). Rollouts read the "
        "whole step before the gate scales it toward the base, so they sit above the target; at "
        "0.5 the coefficient reached 0.5-0.6 in four rounds and every taste fell back.",
    )
    kl_fall_clip: float = Field(
        0.5,
        gt=0,
        lt=1,
        description="The adaptive KL coefficient falls by up to this fraction per horizon (the "
        "error is clipped to at least minus this). At 0.5 a policy that stays near the base "
        "(thumbs only) brings 0.2 to 0.07 in two rounds; at the paper's 0.2, in five.",
    )
    missing_eos_penalty: float | None = Field(
        1.0,
        description="Subtracted from the normalised score of a PPO answer cut without EOS "
        "at the served limit (as TRL's missing_eos_penalty); empty = no penalty.",
    )
    ppo_unfinished: Literal["bootstrap", "penalty"] = Field(
        "bootstrap",
        description="A PPO answer that stops at RLHF_PPO_NEW_TOKENS, below the served limit, "
        "would go on when served. 'bootstrap': it gets no score; the critic's value of where "
        "it stopped stands in for one. 'penalty': the reward model scores the unfinished text "
        "and RLHF_MISSING_EOS_PENALTY is subtracted, which teaches every taste to finish within "
        "the rollout length.",
    )
    demo_coef: float = Field(
        0.5,
        ge=0,
        description="Weight of imitating people's rewrites in each PPO step (0 = pure PPO).",
    )
    demo_max_tokens: int | None = Field(
        None,
        ge=1,
        description="Longest rewrite imitated, in tokens; longer ones are cut and get no EOS "
        "(unset = RLHF_MAX_NEW_TOKENS, the served answer limit).",
    )
    demo_tokens: Literal["edited", "all"] = Field(
        "edited",
        description="Which tokens of a rewrite are imitated: 'edited' = only what the person "
        "changed and where they stopped (at the words they kept, only that the answer went "
        "on), 'all' = the whole rewrite, also the words they kept (the policy's own sample: "
        "imitating those only sharpens it).",
    )
    kl_budget: float = Field(
        10.0,
        ge=0,
        description="Gate: a round is refused when the 95% upper bound of the served KL of "
        "its policy to the base model (nats per answer) exceeds this.",
    )
    kl_round_budget: float = Field(
        8.0,
        ge=0,
        description="Gate: a round is refused when the 95% upper bound of the served KL of "
        "its policy to the version it started from exceeds this.",
    )
    kl_barrier: bool = Field(
        False,
        description="Scale each round's KL coefficient by 1/(1 - K/budget), K the parent's "
        "served KL bound (a log barrier, at most 10x), and the imitation weight by its inverse. "
        "Off by default: measured on bullets and question it held the KL but lost taste.",
    )
    kl_backtrack_steps: int = Field(
        3,
        ge=0,
        description="When a round's update overshoots a KL budget, shrink it up to this many "
        "times (each a new served-KL measurement, ~30 s on SmolLM2) before refusing it: its "
        "adapter scaled toward the base where that keeps more of the round (and for the first "
        "version), each scale predicted from the last measurement; else moved back toward the "
        "parent version (the fraction predicted to fit, then halves of it). A scaled search from "
        "a parent of its own measures the parent's side once more, and the round's reward model "
        "chooses between the two; the chosen one is measured again on other prompts.",
    )
    gate_samples: int = Field(
        16,
        ge=1,
        description="Answers the KL gate samples as served (RLHF_MAX_NEW_TOKENS, temperature, "
        "top-p), to held-out contexts no round trained on, to measure the served KL; a "
        "candidate the search chose is measured again on as many other such prompts; more: a "
        "tighter bound, a longer gate.",
    )
    reward_gate_alpha: float = Field(
        0.05,
        gt=0,
        le=1,
        description="Gate: a round is refused when its retrained reward model is worse on the "
        "held-out pairs with this significance (sign test on the pairs made worse, without the one "
        "person whose pairs got most worse; 1 = any drop refuses).",
    )
    round_time_limit_s: int = Field(
        1800, ge=1, description="Soft time limit of one training round."
    )
    seed: int = Field(
        0,
        description="Base seed of training rounds; each round's seed is derived from it and "
        "the round.",
    )
    lock_ttl_s: float = Field(
        30.0,
        gt=0,
        description="Training lock lease; renewed while a round runs, so a killed worker "
        "blocks the next round for at most this long.",
    )
    round_check_s: float = Field(
        15.0,
        ge=0,
        description="Workers check this often for a round that is due (enough feedback, or a "
        "round whose worker died): a killed round re-runs without waiting for new feedback "
        "(0 = never).",
    )
    keep_adapters: int = Field(
        20,
        ge=0,
        description="Stored adapters: the newest this-many versions keep their weights (and "
        "the current one and the newest reward model); older ones cannot be rolled back to. "
        "0 = keep all.",
    )
    debug_round_delay_s: float = Field(
        0.0, ge=0, description="Testing only: sleep this long inside each round (crash tests)."
    )

    # --- live A/B (canary) -------------------------------------------------------
    canary_share: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Share of users (by a stable hash) a new version serves as a candidate "
        "before it is promoted; 0 = a version that passes the gate is current at once.",
    )
    canary_alpha: float = Field(
        0.05,
        gt=0,
        lt=1,
        description="Error rate of each automatic canary decision (always-valid mSPRT).",
    )
    canary_min_votes: int = Field(
        100, ge=1, description="Candidate votes (👍/👎/rewrites) needed before it can be promoted."
    )
    canary_burn_in: int = Field(
        20, ge=0, description="Votes per version before the canary test decides anything."
    )
    canary_margin: float = Field(
        0.05,
        ge=0,
        le=1,
        description="Promote when the candidate's 👍 rate is not worse than the current one's "
        "by more than this, with confidence (0 = only when better).",
    )
    canary_mixture_sd: float = Field(
        0.1, gt=0, description="mSPRT mixture sd: the 👍-rate difference the test is tuned to."
    )
    canary_timeout_s: float = Field(
        86400.0,
        gt=0,
        description="A canary still undecided after this long takes the timeout action.",
    )
    canary_timeout_action: Literal["rollback", "promote"] = Field(
        "rollback", description="'rollback' (keep the current version) or 'promote' at timeout."
    )
    canary_max_votes_per_user: int = Field(
        50,
        ge=1,
        description="Votes one person counts in a canary (so one person cannot decide it), "
        "and arena battles per version on the leaderboard.",
    )
    canary_check_s: float = Field(
        15.0,
        ge=0,
        description="How often each worker looks at the running canary (0 = never: decisions "
        "are then only an admin's).",
    )

    @field_validator("*", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any, info: ValidationInfo) -> Any:
        # RLHF_TARGET_KL= is how an operator picks "unset" (a fixed coefficient) for a
        # setting whose default is a number; pydantic would refuse "" as not a number.
        if value == "" and _optional(cls.model_fields[info.field_name].annotation):
            return None
        return value

    @model_validator(mode="after")
    def _no_retired_settings(self) -> Settings:
        for name, instead in RETIRED_SETTINGS.items():
            if name in os.environ:
                raise ValueError(f"{name} is no longer read: {instead}")
        return self

    def resolved_artifact_dir(self) -> Path:
        return Path(self.artifact_dir) if self.artifact_dir else Path(self.data_dir) / "artifacts"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read from the environment once."""
    return Settings()
