"""Server settings. Precedence: command-line flags > LSTM_SERVE_* environment variables > the defaults below.

The CLI flags and docs/operations.md are generated from these fields, so they cannot drift apart.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LSTM_SERVE_", extra="forbid")

    host: str = Field("127.0.0.1", description="Address to listen on for gRPC (0.0.0.0 in a container).")
    port: int = Field(50051, ge=0, le=65535, description="gRPC port; 0 picks a free one.")
    metrics_host: str = Field("127.0.0.1", description="Address for the Prometheus /metrics endpoint.")
    metrics_port: int = Field(9464, ge=-1, le=65535, description="Port of /metrics; 0 picks a free one, -1 disables.")
    model_dir: Path = Field(Path("models"), description="Model repository: one sub-directory per model.")
    models: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Serve only these models (directory names); empty means all."
    )
    version_policy: str = Field(
        "latest:1",
        description="Which versions of a model are served, unless its model.toml says (version_policy): 'latest:N' "
        "(the N highest that load), 'all', or 'specific:1,3'.",
    )
    model_poll_interval: float = Field(
        0.0,
        ge=0,
        description="Seconds between checks of the model repository for changes, reloaded as by the ReloadModels "
        "admin call; 0 = no watch. With --workers > 1 this is how every process picks up new versions.",
    )
    version_drain_timeout: float = Field(
        3600.0,
        ge=0,
        description="Seconds a retired model version keeps serving the sessions pinned to it; then they end (reason "
        "model_retired). With the memory store it goes as soon as none is left.",
    )
    admin_tokens_file: Path | None = Field(
        None,
        description="Tokens allowed to call lstm.v1.ModelAdminService (load/unload/reload): lines 'name:sha256-hex' "
        "like --tokens-file; re-read when it changes. Unset: admin calls are refused (see --admin-loopback).",
    )
    admin_loopback: bool = Field(
        False,
        description="Local development only: allow lstm.v1.ModelAdminService calls from 127.0.0.1/::1 without an "
        "admin token.",
    )
    session_ttl: float = Field(
        3600.0, ge=0, description="Default idle time-to-live of a session, seconds; 0 = never expire."
    )
    store: str = Field(
        "memory",
        description="Where sessions live: 'memory' (this process) or redis://HOST:PORT/DB (shared by every worker and "
        "replica; also rediss:// and unix://).",
    )
    store_prefix: str = Field("lstm:", description="Prefix of every Redis key (several deployments on one Redis).")
    store_timeout: float = Field(
        2.0, gt=0, description="Seconds to wait for Redis before answering UNAVAILABLE (the client retries)."
    )
    snapshot: Path | None = Field(
        None,
        description="Memory store only: write every session to this file on shutdown and load it at start, so a "
        "restart loses nothing.",
    )
    snapshot_interval: float = Field(
        30.0,
        ge=0,
        description="With --snapshot, also write it every this many seconds, so that a crash loses at most that "
        "much; 0 = only at shutdown.",
    )
    workers: int = Field(
        1,
        ge=1,
        le=256,
        description="Server processes sharing the port (SO_REUSEPORT); more than 1 needs --store redis.",
    )
    max_sessions: int = Field(
        100_000, ge=1, description="Live sessions at most (store-wide with Redis); see --max-sessions-policy."
    )
    max_session_bytes: int = Field(
        1 << 30,
        ge=1 << 20,
        description="Memory store: bytes the sessions' records (state and last reply) may take together; past it, "
        "the --max-sessions-policy applies. With Redis: what each process's cache of records may take (Redis itself: "
        "its maxmemory).",
    )
    max_sessions_policy: Literal["evict", "refuse"] = Field(
        "evict",
        description="At --max-sessions: 'evict' ends the least recently used session, 'refuse' answers "
        "RESOURCE_EXHAUSTED.",
    )
    ended_session_memory: float = Field(
        3600.0, ge=0, description="Seconds to remember why a session ended (closed/expired/evicted) for NOT_FOUND."
    )
    sweep_interval: float = Field(5.0, gt=0, description="Seconds between sweeps for idle-expired sessions.")
    max_message_bytes: int = Field(
        4 * 1024 * 1024, ge=1024, description="Largest gRPC message accepted or sent, bytes."
    )
    max_steps_per_request: int = Field(4096, ge=1, description="Time steps at most in one Step/Predict request.")
    max_forecast_horizon: int = Field(1024, ge=1, description="Steps at most that one Forecast request rolls forward.")
    bound_session_grace: float = Field(
        30.0,
        ge=0,
        description="Sessions bound to a step stream (metadata lstm-bind-sessions) whose stream broke are closed this "
        "many seconds later unless stepped again meanwhile (a reconnect); a stream the client ends closes them at "
        "once.",
    )
    max_concurrent_rpcs: int = Field(
        4096,
        ge=1,
        description="Calls in progress at most (unary calls plus open streams; health checks never count); more are "
        "refused with RESOURCE_EXHAUSTED.",
    )
    max_calls_per_peer: int = Field(
        512,
        ge=1,
        description="The same, per client address (behind a proxy every call comes from the proxy: raise it there).",
    )
    stream_idle_timeout: float = Field(
        300.0, ge=0, description="Seconds a stream may send nothing before it is ended (UNAVAILABLE); 0 = never."
    )
    max_batch: int = Field(64, ge=1, description="Sessions at most in one batched backend call.")
    max_batch_wait: float = Field(
        0.0, ge=0, description="Seconds a busy batcher may wait to fill a batch; never waits when idle."
    )
    compute_threads: int = Field(
        1, ge=0, description="Threads computing the big models (see --inline-max-parameters); 0 = all on the loop."
    )
    inline_max_parameters: int = Field(
        200_000,
        ge=0,
        description="Models with at most this many weights compute on the event loop, bigger ones in compute threads.",
    )
    inline_max_steps: int = Field(
        32,
        ge=0,
        description="Requests of more time steps than this compute in the compute threads even for small models, so "
        "that long requests never hold the event loop.",
    )
    tls_cert: Path | None = Field(
        None,
        description="PEM certificate chain of the gRPC port: serve TLS (with --tls-key). Re-read when the file "
        "changes, for new connections.",
    )
    tls_key: Path | None = Field(None, description="PEM private key of --tls-cert.")
    tls_client_ca: Path | None = Field(
        None,
        description="PEM CA certificate(s): require every client to present a certificate they signed (mutual TLS; "
        "needs --tls-cert).",
    )
    tokens_file: Path | None = Field(
        None,
        description="Require a bearer token on lstm.v1 calls: lines 'tenant:sha256-hex-of-token' (docs/security.md); "
        "re-read when it changes. Unset (and no --tokens): no authentication.",
    )
    tokens: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="More 'tenant:sha256-hex' entries, comma-separated, added to --tokens-file's.",
    )
    max_sessions_per_tenant: int = Field(
        0,
        ge=0,
        description="Live sessions at most per tenant, store-wide; more are refused (RESOURCE_EXHAUSTED). 0 = no "
        "limit. Without tokens all clients are one tenant.",
    )
    tenant_rate: float = Field(
        0.0,
        ge=0,
        description="Requests per second per tenant and process (unary calls and stream requests), a token bucket; "
        "more are refused (RESOURCE_EXHAUSTED, reason rate_limited). 0 = no limit.",
    )
    tenant_burst: int = Field(
        0, ge=0, description="Requests a tenant may send at once above --tenant-rate; 0 = one second's worth."
    )
    oip: bool = Field(
        True,
        description="Also serve the Open Inference Protocol (KServe v2 gRPC, inference.GRPCInferenceService: "
        "tritonclient and other OIP clients) on the gRPC port; docs/oip.md.",
    )
    shutdown_grace: float = Field(5.0, ge=0, description="Seconds in-flight RPCs get to finish on SIGTERM.")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Log level.")
    log_json: bool = Field(False, description="Log one JSON object per line.")

    @field_validator("store")
    @classmethod
    def _known_store(cls, value: str) -> str:
        if value != "memory" and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("store must be 'memory' or a redis://, rediss:// or unix:// URL")
        return value

    @model_validator(mode="after")
    def _store_fits(self) -> Settings:
        if self.workers > 1 and self.store == "memory":
            raise ValueError(
                "workers > 1 needs a shared store (--store redis://...): with the memory store each process would "
                "hold its own sessions, and the kernel would spread a client's calls over them"
            )
        if self.snapshot is not None and self.store != "memory":
            raise ValueError("snapshot is for the memory store; Redis keeps sessions itself (see its persistence)")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("tls_client_ca (mutual TLS) needs tls_cert and tls_key")
        return self

    @field_validator("version_policy")
    @classmethod
    def _known_policy(cls, value: str) -> str:
        from lstm_serve.engine.repository import VersionPolicy

        return str(VersionPolicy.parse(value))  # ValueError names the forms

    @property
    def authenticated(self) -> bool:
        return self.tokens_file is not None or bool(self.tokens)

    @property
    def shared_store(self) -> bool:
        return self.store != "memory"

    @field_validator("models", "tokens", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        """LSTM_SERVE_MODELS=a,b reads as ["a", "b"]."""
        if isinstance(value, str):
            return [name.strip() for name in value.split(",") if name.strip()]
        return value
