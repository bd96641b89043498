"""One settings object, read from ``UFCAL_*`` environment variables (and a ``.env`` file)."""

from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.calibration.prompts import SUBSTITUTE_TEXT, PromptTemplate

Mode = Literal["auto", "logprobs", "sampling"]
Dtype = Literal["auto", "half", "float16", "bfloat16", "float", "float32"]
Routing = Literal["affinity", "round_robin"]  # service/engines/routing.py
EngineAPI = Literal["auto", "vllm", "openai"]  # service/engines/openai_http.py


def _default_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "ufcal" / "models"


class Settings(BaseSettings):
    """Every knob of the service; the README's configuration table lists them."""

    model_config = SettingsConfigDict(env_prefix="UFCAL_", env_file=".env", extra="ignore")

    # Model and engine
    model: str | None = Field(
        default=None,
        description="Local HF folder or model id for the in-process engine; "
        "empty = the embedded SmolLM2-135M-Instruct.",
    )
    model_cache: Path = Field(
        default_factory=_default_cache, description="Where the embedded model is converted to."
    )
    served_model: str | None = Field(
        default=None, description="Model name to report (and to request from a remote server)."
    )
    engine_url: str = Field(
        default="",
        description="Comma-separated base URLs of OpenAI-compatible servers (vLLM's, or "
        "others: UFCAL_ENGINE_API); empty = in-process vLLM.",
    )
    engine_api_key: SecretStr | None = Field(
        default=None, description="Bearer key for the engine URLs."
    )
    engine_timeout_s: float = Field(default=120.0, gt=0, description="Timeout of one engine call.")
    engine_api: EngineAPI = Field(
        default="auto",
        description="What the engine URLs speak: vllm = vLLM's OpenAI server with its "
        "extensions, openai = standard OpenAI fields only (Ollama, llama.cpp, TGI, hosted "
        "APIs; docs/engines.md says what is lost), auto = ask the first server's GET /version "
        "once at start (vLLM answers it).",
    )
    engine_routing: Routing = Field(
        default="affinity",
        description="Several engine URLs: affinity = every prompt of a question to one server "
        "(rendezvous hashing; its prefix cache serves the shared prefix), round_robin = each "
        "request to the next server.",
    )
    engine_load_guard: float = Field(
        default=0.0,
        ge=0,
        description="Affinity: take a question's second server when its first has at least "
        "this many times (the second's in-flight requests + 1) in flight; 0 = off.",
    )

    # In-process vLLM
    vllm_dtype: Dtype = Field(
        default="auto",
        description="auto = float32 on CPU (deterministic reads), model dtype on GPU.",
    )
    vllm_max_model_len: int = Field(default=4096, ge=256)
    vllm_block_size: int | None = Field(
        default=32, description="KV block size; 32 lets prefix caching hit on short prompts."
    )
    vllm_enforce_eager: bool = True
    vllm_gpu_memory_utilization: float = Field(default=0.85, gt=0, le=1)
    vllm_cpu_kvcache_space_gib: int = Field(default=1, ge=1)
    vllm_cpu_threads_bind: str | None = Field(
        default=None, description="Cores for vLLM on CPU (default: all, e.g. 0-1)."
    )
    vllm_tensor_parallel_size: int = Field(default=1, ge=1)

    # Prompt
    prompt_chat: bool = Field(default=True, description="Use the model's chat template.")
    system_prompt: str | None = None
    instruction: str = "Answer with the letter of the correct option only."
    answer_prefix: str = "Answer:"
    few_shot: str = Field(default="", description="Text placed before every question.")
    substitute_text: str = SUBSTITUTE_TEXT

    # Free-form questions (service/scoring_freeform.py)
    freeform_nli_model: Path | None = Field(
        default=None,
        description="Local folder of an NLI cross-encoder (e.g. DeBERTa-MNLI) that groups "
        "free-form answers by bidirectional entailment; empty = the engine's own model "
        "judges (yes/no).",
    )

    # Evaluation (ufcal eval)
    data_dir: Path = Field(
        default=Path("../shared/data/mcqa"),
        description="Where ufcal eval looks up bare MCQA file names.",
    )

    # Method defaults (each overridable per request)
    mode: Mode = "auto"
    samples: int = Field(default=10, ge=1, le=64)
    temperature: float = Field(default=1.0, gt=0)
    tau: float = Field(default=2.0, gt=0)
    eps: float = Field(default=0.01, ge=0, lt=1)
    skip_mass: float = Field(
        default=0.0,
        ge=0,
        lt=1,
        description="Cost bound: skip the least likely chain starts up to this share of "
        "the start set's mass (0 = spec-exact).",
    )
    max_prompts_per_question: int = Field(
        default=64,
        ge=0,
        description="Work budget: the most prompts one question may send (0 = no bound); "
        "chain starts are planned to fit and the reply says when it bound "
        "(usage.budget_hit). A request may lower it (max_prompts).",
    )

    # Scores, feedback and live calibration
    db_url: SecretStr | None = Field(
        default=None,
        description="Database of scores and feedback: sqlite:///path or "
        "postgresql://user:password@host:port/db (shared by replicas); empty = UFCAL_DB_PATH.",
    )
    db_path: Path = Field(
        default=Path("./ufcal.db"),
        description="SQLite file of scores and feedback, when UFCAL_DB_URL is empty.",
    )
    db_timeout_s: float = Field(
        default=5.0,
        gt=0,
        description="Database connect/statement timeout; /feedback answers 503 beyond it.",
    )
    db_pool_size: int = Field(
        default=8,
        ge=1,
        description="PostgreSQL connections per replica (keep replicas x this under the "
        "server's max_connections, 100 by default).",
    )
    db_score_buffer: int = Field(
        default=10_000,
        ge=1,
        description="Scores held in memory while the database is unreachable; beyond it "
        "they are dropped and counted (ufcal_store_scores_dropped_total).",
    )
    live_refresh_s: float = Field(
        default=2.0,
        gt=0,
        description="With PostgreSQL: how often a replica re-reads the live window, so all "
        "replicas answer /calibration the same within this interval.",
    )
    calibration_window: int = Field(
        default=1000, ge=1, description="Live calibration: the last N scores with feedback."
    )
    calibration_bins: int = Field(
        default=10, ge=1, le=100, description="Live calibration: equal-width confidence bins."
    )

    # Recalibration (docs: README, "Recalibration")
    calibrators: str = Field(
        default="",
        description="Comma-separated calibrator files (ufcal calibrate) loaded at start.",
    )
    recalibrate: Literal["off", "online"] = Field(
        default="off", description="online: refit calibrators from /feedback labels."
    )
    recalibrate_every: int = Field(
        default=100, ge=1, description="Refit a key after this many new labels."
    )
    recalibrate_min_labels: int = Field(
        default=100, ge=2, description="No calibrator below this many labels for a key."
    )
    recalibrate_min_class: int = Field(
        default=20, ge=2, description="No calibrator with fewer right (or wrong) answers."
    )
    recalibrate_max_source_share: float = Field(
        default=0.5,
        gt=0,
        le=1,
        description="Largest share of a fit's labels one API key may hold (the rest is left out).",
    )
    calibrator_refresh_s: float = Field(
        default=30.0, gt=0, description="How often active calibrators are re-read from the store."
    )

    # HTTP
    max_batch_size: int = Field(default=256, ge=1, description="Items in one /score/batch.")
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    request_read_timeout_s: float = Field(
        default=10.0,
        gt=0,
        description="A request must arrive whole (headers and body) this long after its "
        "first byte, a new connection must start one as soon (else 408 and closed).",
    )
    keepalive_timeout_s: float = Field(
        default=5.0, gt=0, description="An idle keep-alive connection is closed after this."
    )
    max_idle_connections: int = Field(
        default=256, ge=0, description="Idle keep-alive connections held at most."
    )
    log_level: str = "info"
    log_text: bool = Field(default=False, description="Log question and option text.")
    ui: bool = Field(default=True, description="Serve the web page at / (UFCAL_UI=off removes it).")

    # Limits: each refusal is a 4xx naming the limit (docs/reliability.md)
    max_body_bytes: int = Field(
        default=1_048_576, ge=1024, description="Largest request body (413 beyond it)."
    )
    max_options: int = Field(default=26, ge=2, le=26, description="Options per question.")
    max_question_chars: int = Field(default=8000, ge=1, description="Length of a question.")
    max_option_chars: int = Field(default=2000, ge=1, description="Length of one option.")
    max_samples: int = Field(default=64, ge=1, le=64, description="Largest K per request.")

    # Authentication
    api_keys: SecretStr | None = Field(
        default=None,
        description="Comma-separated API keys (bearer tokens); empty = no authentication.",
    )
    metrics_auth: bool = Field(default=False, description="/metrics also needs an API key.")
    feedback_keys: SecretStr | None = Field(
        default=None,
        description="Comma-separated API keys allowed to send /feedback; empty = any key.",
    )

    # Backpressure, deadlines, engine faults, shutdown
    max_concurrency: int = Field(
        default=16, ge=1, description="Requests (or batch items) scored at once."
    )
    max_queue: int = Field(
        default=64, ge=0, description="Requests waiting for a slot; beyond it 429 at once."
    )
    request_timeout_s: float = Field(
        default=20.0, gt=0, description="Deadline of one request, queueing included (504)."
    )
    engine_retry_s: float = Field(
        default=5.0,
        ge=0,
        description="How long an engine call retries connection errors before 503.",
    )
    health_interval_s: float = Field(
        default=2.0, gt=0, description="How often the engine's health is probed."
    )
    shutdown_grace_s: float = Field(
        default=25.0,
        ge=0,
        description="SIGTERM: how long in-flight requests may finish (keep it above "
        "UFCAL_REQUEST_TIMEOUT_S and below the orchestrator's kill timeout, 30 s).",
    )

    def database(self) -> str | Path:
        """UFCAL_DB_URL, or else the SQLite file UFCAL_DB_PATH."""
        if self.db_url is not None and self.db_url.get_secret_value().strip():
            return self.db_url.get_secret_value().strip()
        return self.db_path

    def api_key_list(self) -> list[str]:
        """The configured API keys (empty: authentication is off)."""
        if self.api_keys is None:
            return []
        return [k.strip() for k in self.api_keys.get_secret_value().split(",") if k.strip()]

    def feedback_key_list(self) -> list[str]:
        """The keys allowed to send /feedback (empty: every accepted key)."""
        if self.feedback_keys is None:
            return []
        return [k.strip() for k in self.feedback_keys.get_secret_value().split(",") if k.strip()]

    def calibrator_files(self) -> list[Path]:
        """The calibrator files to load at start."""
        return [Path(f.strip()) for f in self.calibrators.split(",") if f.strip()]

    @cached_property
    def engine_urls(self) -> list[str]:
        """The engine URLs as a list (empty = in-process engine)."""
        return [u.strip() for u in self.engine_url.split(",") if u.strip()]

    def prompt_template(self) -> PromptTemplate:
        """The prompt template these settings describe."""
        return PromptTemplate(
            chat=self.prompt_chat,
            system_prompt=self.system_prompt,
            instruction=self.instruction,
            answer_prefix=self.answer_prefix,
            few_shot=self.few_shot,
            substitute_text=self.substitute_text,
        )

    def cpu_threads_bind(self) -> str:
        """The cores vLLM's CPU backend binds its threads to."""
        if self.vllm_cpu_threads_bind:
            return self.vllm_cpu_threads_bind
        return f"0-{max(0, (os.cpu_count() or 1) - 1)}"
