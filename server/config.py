"""One typed settings tree for the server: defaults here, then a YAML file, then environment, then flags.

Every limit the server enforces lives in this module with its default. Sources, weakest first:

1. the defaults below;
2. a YAML file (``--config PATH`` or ``LORAPLEX_CONFIG``) shaped like the tree (``engine: {max_queue: 64}``);
3. environment variables ``LORAPLEX_<SECTION>__<FIELD>`` (``LORAPLEX_ENGINE__MAX_QUEUE=64``);
4. command-line flags ``--<section>.<field>`` (``--engine.max-queue 64``) and the short aliases in ``FLAG_ALIASES``.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.fields import FieldInfo

GIB = 1 << 30
MIB = 1 << 20

QuantizationName = Literal["none", "int8", "nf4", "fp8"]
DTypeName = Literal["auto", "float32", "bfloat16", "float16"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def default_cache_dir() -> Path:
    """Where converted base models live: ``$LORAPLEX_CACHE_DIR``, else ``$XDG_CACHE_HOME/loraplex``."""
    explicit = os.environ.get("LORAPLEX_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "loraplex"


def is_loopback(host: str) -> bool:
    """True when ``host`` names only this machine (``localhost``, 127.0.0.0/8, ``::1``)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class ModelSettings(_Section):
    """The one base model the server holds."""

    base_model: str = Field("embedded", description="'embedded' (SmolLM2-135M-Instruct), an HF model dir or a .gguf")
    quantization: QuantizationName | None = Field(
        None,
        description="none|int8|nf4|fp8 (fp8: compute capability 8.9+ on CUDA, a reference path on CPU); "
        "default nf4 on CUDA, none on CPU",
    )
    device: str = Field("auto", description="auto|cpu|cuda|cuda:N")
    dtype: DTypeName = Field(
        "auto",
        description="compute dtype; auto = bfloat16 on CUDA, and on a CPU with native bfloat16 (AVX512-BF16, AMX) "
        "for an unquantized base; float32 otherwise (float32 matches PEFT to 1e-3, bfloat16 is 2-3x faster)",
    )
    cache_dir: Path = Field(default_factory=default_cache_dir, description="converted-model cache")
    threads: int = Field(0, ge=0, description="torch CPU threads; 0 = torch's default")


class AdapterSettings(_Section):
    """Adapter sources and the two-tier adapter cache."""

    roots: tuple[Path, ...] = Field((Path("adapters"),), description="directories adapter ids resolve under")
    max_rank: int = Field(128, ge=1, le=1024, description="largest LoRA rank accepted")
    device_slots: int = Field(32, ge=1, description="adapters resident on the compute device at once")
    device_bytes: int = Field(2 * GIB, ge=MIB, description="bytes of device memory for adapter slots")
    host_bytes: int = Field(8 * GIB, ge=MIB, description="bytes of host memory for the adapter LRU")
    max_file_bytes: int = Field(1 * GIB, ge=1, description="largest adapter weights file read")
    loader_threads: int = Field(2, ge=1, le=64, description="threads that read adapters from disk")
    fetch_latency_ms: float = Field(
        0.0,
        ge=0,
        le=600_000,
        description="test and benchmark knob: every read of an adapter from its root into host memory waits this "
        "long first, as a fetch from a remote store (object storage, NFS) would; 0 for local disks",
    )
    fetch_bytes_per_s: int = Field(
        0,
        ge=0,
        description="test and benchmark knob: the bandwidth of that emulated store (the weights file's size over "
        "it is added to the wait); 0 = no limit",
    )
    preload: tuple[str, ...] = Field((), description="adapter ids loaded at start-up")
    list_limit: int = Field(
        1000,
        ge=1,
        le=100_000,
        description="most adapters one ListAdapters or RepositoryIndex answer names; beyond it those in memory are "
        "kept before those only on disk",
    )
    upload_root: Path | None = Field(
        None, description="adapter root that UploadAdapter writes into (one of roots); unset = the first root"
    )

    @model_validator(mode="after")
    def _upload_root_is_a_root(self) -> AdapterSettings:
        if self.upload_root is not None and self.upload_root.resolve() not in {r.resolve() for r in self.roots}:
            raise ValueError(
                f"adapters.upload_root {self.upload_root} is not one of adapters.roots; uploaded adapters must "
                "land where adapter ids resolve: add it to roots"
            )
        return self

    def upload_directory(self) -> Path | None:
        """The root uploads are written under: upload_root, else the first root (None without roots)."""
        return self.upload_root or (self.roots[0] if self.roots else None)


class EngineSettings(_Section):
    """Continuous batching, KV cache and request limits."""

    max_queue: int = Field(
        None,  # filled in by _derive_queue
        ge=1,
        validate_default=True,
        description="requests waiting beyond this are refused (Overloaded); unset = max_running // 2 (at least 1): "
        "a queued request then starts within about half a batch's service time, so admitted requests stay within "
        "~1.5x the latency at capacity (set it higher to absorb bursts at the cost of latency)",
    )
    max_running: int = Field(32, ge=1, description="sequences in the running batch")
    max_batch_tokens: int = Field(512, ge=16, description="tokens (prefill + decode) in one forward pass")
    adapter_prefetch: int = Field(
        4,
        ge=0,
        description="adapters of the next waiting requests placed on the device after each step, ahead of their "
        "admission (only into free slots or their own pool's idle ones); 0 = off",
    )
    kv_cache_tokens: int = Field(
        32768, ge=256, description="KV cache capacity in tokens, all sequences together (rounded up to whole blocks)"
    )
    kv_block_size: int = Field(
        16,
        ge=1,
        le=256,
        description="tokens per KV-cache block: a sequence holds whole blocks, taken as its tokens are computed",
    )
    prefix_cache: bool = Field(
        True,
        description="reuse the KV blocks of a prompt prefix computed before (full blocks keyed by base, adapter "
        "version's content hash, tenant or cache salt and every token so far); idle cached blocks are evicted "
        "least recently used when live sequences need room",
    )
    prefix_cache_share_tenants: bool = Field(
        False,
        description="let requests of different tenants reuse each other's cached blocks (requests with a "
        "cache_salt still only meet their salt); off by default, as a shared cache leaks prompts through time "
        "to first token",
    )
    fair_share: bool = Field(
        True,
        description="weigh tenants (the tokens file's tenant and weight) in admission, preemption and refusals: "
        "the lowest virtual token counter first, each tenant's weighted share of the running batch reclaimed "
        "within a step, a full queue refusing the tenants over their share first (server/engine/fairness.py); "
        "false = first come, first served",
    )
    max_seq_len: int = Field(4096, ge=16, description="prompt + new tokens of one request")
    max_prompt_tokens: int = Field(4096, ge=1, description="longest prompt accepted")
    max_new_tokens: int = Field(1024, ge=1, description="largest max_new_tokens accepted")
    max_stop_sequences: int = Field(16, ge=0, description="stop strings per request")
    max_stop_length: int = Field(256, ge=1, description="characters per stop string")
    max_stream_backlog: int = Field(1024, ge=1, description="undelivered events before a slow reader is cancelled")
    idle_poll_s: float = Field(0.05, gt=0, description="how long the idle engine loop sleeps between inbox checks")
    lora_dtype: Literal["auto", "float32", "model"] = Field(
        "auto",
        description="dtype of the adapters' device slot stacks: auto is the model's dtype, except float32 on CPU "
        "where the compiled fused LoRA kernel is unavailable (eager one-row-per-adapter matmuls in bfloat16 run at "
        "about half the float32 speed there, measured in loadtests/BENCHMARKS.md); float32 doubles the adapter bytes "
        "of a bfloat16 model within adapters.device_bytes",
    )
    lora_kernel: Literal["auto", "grouped", "gather", "triton"] = Field(
        "auto",
        description="batched LoRA kernel: auto picks per layer call from its shape (on CPU by the measured rule: "
        "gather/window/fused for decode over distinct adapters, grouped_mm for prefill and few adapters; on CUDA by "
        "a start-up calibration timing grouped, gather, window and the Triton kernels on the device); grouped, "
        "gather or triton forces one (grouped is refused where torch lacks grouped_mm for the device and dtype, "
        "triton where there is no CUDA device or no triton package)",
    )
    lora_calibration_rank: int = Field(
        16,
        ge=1,
        le=1024,
        description="adapter rank the CUDA start-up calibration of the LoRA kernels times one layer of the base at "
        "(its rank bucket, at most that of adapters.max_rank): a typical rank of the adapters served",
    )
    cuda_graphs: Literal["auto", "on", "off"] = Field(
        "auto",
        description="decode-only steps through the static decode step (server/model/decode_graphs.py): padded to a "
        "batch-size bucket, LoRA row slots and block tables in one static buffer, captured as a CUDA graph per "
        "bucket and pool set on CUDA; auto = on on CUDA, off on CPU (where the static step runs eagerly and is "
        "slower than the eager path: loadtests/BENCHMARKS.md); on on CPU runs it eagerly (for tests); steps it "
        "cannot take (any prefill row, a DoRA adapter, more rows than cuda_graph_max_rows) run eagerly",
    )
    cuda_graph_max_rows: int | None = Field(
        None,
        ge=1,
        description="largest decode step (rows) the static decode step takes, its largest bucket (each bucket's "
        "graph holds its own activations); unset = max_running",
    )

    @model_validator(mode="before")
    @classmethod
    def _derive_queue(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("max_queue") is None:
            try:
                running = int(data.get("max_running", cls.model_fields["max_running"].default))
            except (TypeError, ValueError):
                return data  # max_running's own validation says what is wrong
            return {**data, "max_queue": max(1, running // 2)}
        return data


class ServerSettings(_Section):
    """Network endpoints, TLS and transport limits (used by the API layer)."""

    host: str = Field("127.0.0.1", description="address the gRPC server binds; not loopback needs auth (see auth)")
    port: int = Field(50051, ge=0, le=65535, description="gRPC port; 0 = pick a free one (logged at start-up)")
    metrics_port: int = Field(9464, ge=0, le=65535, description="HTTP /metrics port; 0 = pick a free one")
    metrics_host: str | None = Field(None, description="address the /metrics HTTP server binds; unset = server.host")
    http_port: int = Field(
        8000,
        ge=-1,
        le=65535,
        description="OpenAI-compatible HTTP API port (on server.host); 0 = pick a free one (logged at start-up), "
        "-1 = off",
    )
    max_message_bytes: int = Field(
        4 * MIB, ge=1024, description="largest gRPC message received or sent, and largest HTTP request body"
    )
    max_concurrent_streams: int = Field(
        1024, ge=1, description="generation RPCs in flight at once; more get RESOURCE_EXHAUSTED at once"
    )
    default_max_new_tokens: int = Field(128, ge=1, description="max_new_tokens of a request that sets none")
    max_prompt_chars: int = Field(
        128 * 1024, ge=1, description="longest prompt text (all chat messages together) accepted before tokenizing"
    )
    grace_period_s: float = Field(30.0, ge=0, description="on SIGTERM, how long accepted requests may finish")
    stream_write_timeout_s: float = Field(
        30.0,
        gt=0,
        description="how long a response stream (gRPC server stream, HTTP SSE or body) may wait for a client that "
        "stopped reading before its connection (HTTP) or call (gRPC) is dropped and its request cancelled; "
        "complements engine.max_stream_backlog, which cancels the engine side of a slow reader",
    )
    tls_cert_file: Path | None = Field(None, description="PEM certificate chain; with tls_key_file turns TLS on")
    tls_key_file: Path | None = Field(None, description="PEM private key of tls_cert_file")
    tls_client_ca_file: Path | None = Field(None, description="PEM CA bundle that verifies client certificates")
    tls_require_client_cert: bool = Field(False, description="mutual TLS: refuse clients without a valid cert")

    @model_validator(mode="after")
    def _check_tls(self) -> ServerSettings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("server.tls_cert_file and server.tls_key_file go together: set both or neither")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("server.tls_client_ca_file needs TLS: set server.tls_cert_file and tls_key_file")
        if self.tls_require_client_cert and self.tls_client_ca_file is None:
            raise ValueError("server.tls_require_client_cert needs server.tls_client_ca_file to verify clients")
        return self


class AuthSettings(_Section):
    """Bearer-token auth of the gRPC API (off when no tokens file is set)."""

    tokens_file: Path | None = Field(
        None, description="YAML: token -> {tenant, adapters: [globs], routes: [globs], admin: bool}; unset = no auth"
    )
    allow_remote_without_auth: bool = Field(
        False, description="serve a non-loopback server.host without tokens (only behind a trusted proxy)"
    )


class RoutingSettings(_Section):
    """A/B routes, shadow traffic and feedback statistics (kept in memory; lost at restart)."""

    routes_file: Path | None = Field(
        None, description="YAML routes loaded at start-up and rewritten atomically on changes; unset = in memory only"
    )
    max_routes: int = Field(1000, ge=1, description="routes configured at once")
    feedback_retention: int = Field(
        100_000, ge=1, description="routed request ids remembered for Feedback (least recently served forgotten)"
    )
    latency_samples: int = Field(10_000, ge=10, description="latest latencies kept per variant for report percentiles")
    shadow_max_inflight: int = Field(64, ge=0, description="mirrored requests running at once; more are shed")
    shadow_shed_queue_fraction: float = Field(
        0.5, gt=0, le=1, description="shed mirrored requests while engine waiting >= this share of engine.max_queue"
    )


class ObservabilitySettings(_Section):
    """Prometheus metrics and drift detection."""

    max_adapter_labels: int = Field(
        100, ge=1, description="distinct values of the 'adapter' metric label; later adapters are labelled 'other'"
    )
    drift_window: int = Field(500, ge=10, description="latest requests per adapter compared with its reference")
    drift_min_samples: int = Field(100, ge=1, description="requests in the window before drift scores are exported")
    drift_reference_size: int = Field(
        200, ge=5, description="first requests that form the reference of an adapter without trainer statistics"
    )

    @model_validator(mode="after")
    def _check_window(self) -> ObservabilitySettings:
        if self.drift_min_samples > self.drift_window:
            raise ValueError(
                f"observability.drift_min_samples ({self.drift_min_samples}) exceeds observability.drift_window "
                f"({self.drift_window}): scores would never be exported; lower it or widen the window"
            )
        return self


class Settings(_Section):
    """The whole tree."""

    model: ModelSettings = Field(default_factory=ModelSettings)
    adapters: AdapterSettings = Field(default_factory=AdapterSettings)
    engine: EngineSettings = Field(default_factory=EngineSettings)
    server: ServerSettings = Field(default_factory=ServerSettings)
    auth: AuthSettings = Field(default_factory=AuthSettings)
    routing: RoutingSettings = Field(default_factory=RoutingSettings)
    observability: ObservabilitySettings = Field(default_factory=ObservabilitySettings)

    @model_validator(mode="after")
    def _check_remote_auth(self) -> Settings:
        if (
            not is_loopback(self.server.host)
            and self.auth.tokens_file is None
            and not self.auth.allow_remote_without_auth
        ):
            raise ValueError(
                f"server.host {self.server.host} is reachable from other machines but auth is off: set "
                "auth.tokens_file, or auth.allow_remote_without_auth=true behind a trusted proxy"
            )
        return self

    @model_validator(mode="after")
    def _check_lengths(self) -> Settings:
        eng = self.engine
        if eng.max_seq_len > eng.kv_cache_tokens:
            raise ValueError(
                f"engine.max_seq_len ({eng.max_seq_len}) exceeds engine.kv_cache_tokens ({eng.kv_cache_tokens}): "
                "one request could never fit; raise kv_cache_tokens or lower max_seq_len"
            )
        return self


class SettingsError(ValueError):
    """The settings sources do not form a valid tree; the message names the bad key and why."""


ENV_PREFIX = "LORAPLEX_"
FLAG_ALIASES: dict[str, str] = {
    "base-model": "model.base_model",
    "quantization": "model.quantization",
    "device": "model.device",
    "adapter-root": "adapters.roots",
    "host": "server.host",
    "port": "server.port",
    "metrics-port": "server.metrics_port",
    "http-port": "server.http_port",
    "routes-file": "routing.routes_file",
}


def _sections() -> dict[str, type[_Section]]:
    return {name: field.annotation for name, field in Settings.model_fields.items()}  # type: ignore[misc]


def _field(dotted: str) -> FieldInfo:
    section, _, key = dotted.partition(".")
    if section not in _sections() or key not in _sections()[section].model_fields:
        raise SettingsError(f"unknown setting '{dotted}'")
    return _sections()[section].model_fields[key]


def _set_path(tree: dict[str, Any], dotted: str, value: Any) -> None:
    _field(dotted)
    section, _, key = dotted.partition(".")
    tree.setdefault(section, {})[key] = value


def _is_sequence_field(dotted: str) -> bool:
    return str(_field(dotted).annotation).startswith("tuple")


def _parse_scalar(dotted: str, raw: str) -> Any:
    if _is_sequence_field(dotted):
        return [item for item in raw.split(",") if item]
    return yaml.safe_load(raw) if raw else raw


def _merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    merged = {key: dict(value) if isinstance(value, dict) else value for key, value in base.items()}
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged


def env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """Settings named by ``LORAPLEX_<SECTION>__<FIELD>`` variables."""
    tree: dict[str, Any] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        section, _, key = name[len(ENV_PREFIX) :].lower().partition("__")
        dotted = f"{section}.{key}"
        _set_path(tree, dotted, _parse_scalar(dotted, raw))
    return tree


def add_flags(parser: argparse.ArgumentParser) -> None:
    """Adds ``--config``, ``--<section>.<field>`` for every setting, and the short aliases."""
    parser.add_argument("--config", type=Path, default=None, help="YAML settings file")
    for section, model in _sections().items():
        group = parser.add_argument_group(section)
        for key, field in model.model_fields.items():
            dotted = f"{section}.{key}"
            flags = [f"--{section}.{key.replace('_', '-')}"]
            flags += [f"--{alias}" for alias, target in FLAG_ALIASES.items() if target == dotted]
            help_text = field.description or ""
            if _is_sequence_field(dotted):
                group.add_argument(*flags, dest=dotted, action="append", default=None, help=help_text)
            else:
                group.add_argument(*flags, dest=dotted, default=None, help=help_text)


def flag_overrides(args: argparse.Namespace) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for dotted, raw in vars(args).items():
        if "." not in dotted or raw is None:
            continue
        if isinstance(raw, list):
            value: Any = [item for text in raw for item in text.split(",") if item]
        else:
            value = _parse_scalar(dotted, raw)
        _set_path(tree, dotted, value)
    return tree


def load_settings(
    config_file: Path | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Builds the tree from the file, the environment and explicit overrides (flags), in that order."""
    environ = os.environ if environ is None else environ
    tree: dict[str, Any] = {}
    config_file = config_file or (Path(environ["LORAPLEX_CONFIG"]) if environ.get("LORAPLEX_CONFIG") else None)
    if config_file is not None:
        try:
            loaded = yaml.safe_load(config_file.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise SettingsError(f"cannot read settings file {config_file}: {exc}") from exc
        if not isinstance(loaded, dict):
            raise SettingsError(f"settings file {config_file} must hold a mapping of sections")
        tree = _merge(tree, loaded)
    tree = _merge(tree, env_overrides(environ))
    tree = _merge(tree, overrides or {})
    try:
        return Settings.model_validate(tree)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'settings'}: {err['msg']}" for err in exc.errors()
        )
        raise SettingsError(f"invalid settings: {problems}") from exc


def settings_from_argv(argv: Sequence[str] | None, prog: str = "loraplex-server") -> Settings:
    parser = argparse.ArgumentParser(prog=prog, description="loraplex multi-LoRA gRPC server")
    add_flags(parser)
    args = parser.parse_args(argv)
    try:
        return load_settings(args.config, overrides=flag_overrides(args))
    except SettingsError as exc:
        parser.error(str(exc))
