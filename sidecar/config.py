"""The sidecar's configuration: one frozen dataclass, validated on creation.

Every setting comes, in increasing precedence, from the defaults here, a YAML file
(``--config``), an environment variable ``ERASER_<NAME>`` and a command-line flag.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

import yaml

from eraser import options as defaults
from eraser.errors import InvalidRequestError
from .receipts import ReceiptSigner

ADAPTER_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")


class ConfigError(InvalidRequestError):
    """A setting is missing, of the wrong type, or out of range."""


FACTOR_POLICIES = ("wait", "fallback")
VERIFY_MAX_STEPS = 100_000
VERIFY_MAX_SECONDS = 86_400.0  # a day
MAX_STREAMS = 100_000  # per stream cap: each open stream holds a little memory, not a thread


@dataclass(frozen=True)
class EraseDefaults:
    """Engine settings used where a request's options leave a field empty."""

    # The product's default path (eraser/options.py): EK-FAC factors fitted at registration
    # and after each version, damping relative to the curvature's scale along the request.
    solver: str = defaults.DEFAULT_SOLVER
    preset: str = ""
    curvature: str = "ggn"
    damping: float = defaults.DEFAULT_DAMPING
    objective: str = "influence"
    tolerance: float | None = None
    max_iterations: int | None = None
    curvature_rows: int | None = None
    curvature_batch_size: int = 4
    max_length: int = 512
    # ekfac/kfac need factors fitted for the adapter's current version. They are prepared
    # in the background after each publish; a job that finds none either waits for them
    # ("wait") or runs cg at once ("fallback") and leaves the fit for the next request.
    factor_policy: str = "wait"
    # Refit the factors in full once this share of the rows changed through downdates.
    refit_fraction: float = defaults.DEFAULT_REFIT_FRACTION
    # Verified forgetting (eraser/verify.py): the policy of an adapter registered with a
    # held-out set when neither its registration nor a request names one. enforce: refine
    # until the erased rows look never-seen or fail the job; report: score only. Adapters
    # without a held-out set get a reported verdict against the base model on the ekfac/kfac
    # path (eraser.options.default_verify_policy), none on the others.
    verify: str = "enforce"
    # A policy given at registration is a floor (off < report < enforce): a request may
    # raise it, and lower it only when this is true.
    verify_allow_lower: bool = False
    # The bound and the refinement budget of enforce; empty: the engine's defaults
    # (eraser.verify.VerifyConfig: AUC <= 0.75, 100 steps, 600 s).
    verify_max_auc: float | None = None
    verify_max_steps: int | None = None
    verify_max_seconds: float | None = None
    # The utility check of every erase (eraser.unlearn.EraseConfig.max_retain_rise): the
    # retained rows' mean NLL may rise by at most this many nats, else the job fails and
    # nothing is published; null turns the check off.
    max_retain_rise: float | None = defaults.DEFAULT_MAX_RETAIN_RISE
    # Step control (eraser.secondorder.StepConfig): every step of an erase scaled by a line
    # search that keeps the utility bound; off applies the influence update as computed.
    step_control: bool = True
    # absolute: damping is λ; relative: λ = damping × the curvature's scale along the request.
    damping_scale: str = defaults.DEFAULT_DAMPING_SCALE
    # Ceilings on what a request may ask of a solver: an iteration limit and a tolerance
    # it could never reach would hold the adapter's only worker for hours.
    max_iterations_limit: int = 100_000
    min_tolerance: float = 1e-12

    def __post_init__(self):
        if self.solver not in defaults.SOLVERS:
            raise ConfigError(f"erase.solver must be one of {', '.join(defaults.SOLVERS)}, not {self.solver!r}")
        if self.factor_policy not in FACTOR_POLICIES:
            raise ConfigError(f"erase.factor_policy must be wait or fallback, not {self.factor_policy!r}")
        if not 0 < self.refit_fraction <= 1:
            raise ConfigError(f"erase.refit_fraction must be in (0, 1], not {self.refit_fraction!r}")
        if self.curvature not in ("ggn", "hessian"):
            raise ConfigError(f"erase.curvature must be ggn or hessian, not {self.curvature!r}")
        if self.objective not in ("influence", "newton"):
            raise ConfigError(f"erase.objective must be influence or newton, not {self.objective!r}")
        if not self.damping >= 0:
            raise ConfigError("erase.damping must be >= 0")
        if self.damping_scale not in defaults.DAMPING_SCALES:
            raise ConfigError(f"erase.damping_scale must be absolute or relative, not {self.damping_scale!r}")
        if not isinstance(self.step_control, bool):
            raise ConfigError(f"erase.step_control must be true or false, not {self.step_control!r}")
        if self.max_retain_rise is not None and not (isinstance(self.max_retain_rise, (int, float))
                                                     and 0 <= self.max_retain_rise < float("inf")):
            raise ConfigError(f"erase.max_retain_rise must be a number >= 0 or null, not {self.max_retain_rise!r}")
        if self.curvature_batch_size < 1 or self.max_length < 8:
            raise ConfigError("erase.curvature_batch_size must be >= 1 and erase.max_length >= 8")
        if self.max_iterations_limit < 1 or not 0 < self.min_tolerance < 1:
            raise ConfigError("erase.max_iterations_limit must be >= 1 and erase.min_tolerance in (0, 1)")
        if self.max_iterations is not None and not 1 <= self.max_iterations <= self.max_iterations_limit:
            raise ConfigError(f"erase.max_iterations must be in [1, erase.max_iterations_limit={self.max_iterations_limit}]")
        if self.tolerance is not None and not self.min_tolerance <= self.tolerance < float("inf"):
            raise ConfigError(f"erase.tolerance must be >= erase.min_tolerance={self.min_tolerance:g}")
        # The refinement budget of enforce, per job: bounded like the solver's.
        if self.verify_max_steps is not None and not 0 <= self.verify_max_steps <= VERIFY_MAX_STEPS:
            raise ConfigError(f"erase.verify_max_steps must be in [0, {VERIFY_MAX_STEPS}]")
        if self.verify_max_seconds is not None and not 0 < self.verify_max_seconds <= VERIFY_MAX_SECONDS:
            raise ConfigError(f"erase.verify_max_seconds must be in (0, {VERIFY_MAX_SECONDS}]")
        if self.verify is False:  # YAML 1.1 reads a bare `off` as false
            object.__setattr__(self, "verify", "off")
        if self.verify not in defaults.VERIFY_POLICIES:
            raise ConfigError(f"erase.verify must be one of {', '.join(defaults.VERIFY_POLICIES)}, not {self.verify!r}")
        from eraser.verify import VerifyConfig

        try:
            VerifyConfig(**self.verify_limits())
        except InvalidRequestError as e:
            raise ConfigError(f"erase.verify_{e}") from None

    def verify_limits(self) -> dict:
        """The configured VerifyConfig fields (those left empty take the engine's defaults)."""
        limits = {"max_auc": self.verify_max_auc, "max_steps": self.verify_max_steps,
                  "max_seconds": self.verify_max_seconds}
        return {k: v for k, v in limits.items() if v is not None}


@dataclass(frozen=True)
class SidecarConfig:
    store: Path
    grpc_port: int = 50051
    metrics_port: int = 9464
    device: str = "cpu"
    # 127.0.0.1 keeps a laptop run private; a pod sets 0.0.0.0 (deploy/).
    listen_host: str = "127.0.0.1"
    metrics_host: str = "127.0.0.1"
    # Versions kept per adapter, the current one included. Every older version still
    # holds what later erases removed: this is a privacy setting, not only a disk one.
    keep_versions: int = 2
    # Requests waiting behind a running job for the same adapter join one solve.
    merge_queued: bool = True
    # Erase requests that arrive together share one transaction and one fsync (group
    # commit); False commits each alone (slower under concurrency; equally durable).
    group_commit: bool = True
    max_request_rows: int = 10_000
    # Concurrent solves across adapters (one per adapter at most, always).
    workers: int = 1
    # Graceful shutdown: how long SIGTERM waits for a running job before leaving it to
    # be resumed on the next start.
    drain_seconds: float = 30.0
    # A job interrupted this many times (crashes, restarts) fails instead of resuming.
    max_attempts: int = 3
    # Auth: a bearer token (from a file, or ERASER_TOKEN) and TLS / mutual TLS.
    token: str | None = field(default=None, repr=False)
    token_file: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    # The Ed25519 private key (PKCS#8 PEM) that signs erasure receipts, e.g. a mounted
    # Secret that outlives the store; empty: the store's own key, created once.
    receipt_key: Path | None = None
    # The key read from receipt_key when the config is validated (None: the store's key).
    receipt_signer: ReceiptSigner | None = field(default=None, init=False, repr=False, compare=False)
    # "compute": runs erase jobs, publishes versions, swaps every replica (exactly one per
    # shared store). "reconcile": runs no jobs and only keeps its replicas (its own pod's
    # vLLM) at each adapter's current version, read from the shared store (deploy/README.md).
    role: str = "compute"
    # The job database. Empty: SQLite in the store (one compute sidecar per store). A
    # postgresql:// URI: PostgreSQL, shared by a pool of compute sidecars on one store, each
    # job held under a lease of lease_seconds that its worker renews; a job whose worker
    # stopped renewing is taken over once its lease expires (deploy/README.md, Scaling).
    jobs: str = field(default="", repr=False)
    lease_seconds: float = 30.0
    # Factor fits of large training sets over torch.distributed ranks on this machine (gloo on
    # the CPU, NCCL with one GPU each): up to factor_fit_processes ranks, one per
    # factor_fit_min_rows rows; 1 fits in the sidecar's process.
    factor_fit_processes: int = 1
    factor_fit_min_rows: int = 100_000
    # Serving replicas (vLLM base URLs) that get every adapter's current version.
    vllm_urls: tuple[str, ...] = ()
    vllm_api_key: str | None = field(default=None, repr=False)
    # A job stays in its swap stage, retrying with backoff, until every replica serves the
    # new version or this many seconds pass (then it fails; the version stays current and
    # the reconcile loop keeps trying).
    swap_timeout_seconds: float = 600.0
    # How often every replica is checked and brought to each adapter's current version.
    reconcile_seconds: float = 15.0
    # Largest |log p| difference (nats) between a replica and the sidecar on the probe;
    # float32 serving agrees to ~1e-6 here, bfloat16 needs about 0.1.
    probe_tolerance: float = 0.02
    # Directories RegisterAdapter may copy adapters, training and held-out sets from
    # (sidecar/imports.py). Empty: any server path outside the store (the store is never
    # an import source: its retained versions hold erased rows).
    import_roots: tuple[Path, ...] = ()
    # Long-lived streams, bounded so that they never take the room unary calls and health
    # checks need: WatchJob (and reflection) streams in all and per client (its certificate
    # under mutual TLS, else its address), and health Watch streams, which need no token, in all.
    max_watches: int = 1000
    max_watches_per_client: int = 100
    max_health_watches: int = 100
    # Named base models: RegisterAdapter's base_model may be a key here or a directory.
    base_models: Mapping[str, str] = field(default_factory=dict)
    erase: EraseDefaults = field(default_factory=EraseDefaults)

    def __post_init__(self):
        object.__setattr__(self, "store", Path(self.store))
        for name in ("grpc_port", "metrics_port"):
            port = getattr(self, name)
            if not isinstance(port, int) or not 0 <= port <= 65535:
                raise ConfigError(f"{name} must be a port number (0-65535; 0 picks a free one), not {port!r}")
        if self.keep_versions < 1:
            raise ConfigError("keep_versions must be at least 1 (the current version)")
        if self.workers < 1 or self.max_attempts < 1 or self.max_request_rows < 1:
            raise ConfigError("workers, max_attempts and max_request_rows must be at least 1")
        if self.factor_fit_processes < 1 or self.factor_fit_min_rows < 1:
            raise ConfigError("factor_fit_processes and factor_fit_min_rows must be at least 1")
        if self.drain_seconds < 0:
            raise ConfigError("drain_seconds must be >= 0")
        if not (self.device == "cpu" or re.fullmatch(r"cuda(:\d+)?", self.device)):
            raise ConfigError(f"device must be cpu, cuda or cuda:N, not {self.device!r}")
        self._check_auth()
        if self.jobs and not re.match(r"postgres(ql)?://", self.jobs):
            raise ConfigError("jobs must be empty (SQLite in the store) or a postgresql:// URI")
        if not 1 <= self.lease_seconds <= 3600:
            raise ConfigError(f"lease_seconds must be in [1, 3600], not {self.lease_seconds!r}")
        if self.role not in ("compute", "reconcile"):
            raise ConfigError(f"role must be compute or reconcile, not {self.role!r}")
        urls = self.vllm_urls
        if isinstance(urls, str):
            urls = [u for u in urls.replace(",", " ").split() if u]
        urls = tuple(str(u).rstrip("/") for u in urls)
        for u in urls:
            if not re.fullmatch(r"https?://[^\s/]+(/[^\s]*)?", u):
                raise ConfigError(f"vllm_urls: not an http(s) URL: {u!r}")
        if len(set(urls)) != len(urls):
            raise ConfigError("vllm_urls: the same replica is listed twice")
        object.__setattr__(self, "vllm_urls", urls)
        if self.swap_timeout_seconds <= 0 or self.reconcile_seconds <= 0 or not self.probe_tolerance > 0:
            raise ConfigError("swap_timeout_seconds, reconcile_seconds and probe_tolerance must be > 0")
        for name in ("max_watches", "max_watches_per_client", "max_health_watches"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_STREAMS:
                raise ConfigError(f"{name} must be an integer in [1, {MAX_STREAMS}], not {value!r}")
        if self.max_watches_per_client > self.max_watches:
            raise ConfigError("max_watches_per_client cannot exceed max_watches")
        object.__setattr__(self, "import_roots", _import_roots(self.import_roots, self.store))
        if not isinstance(self.base_models, Mapping):
            raise ConfigError("base_models must map names to directories")
        if isinstance(self.erase, Mapping):
            object.__setattr__(self, "erase", _build(EraseDefaults, self.erase, "erase."))

    def _check_auth(self) -> None:
        """TLS files exist and go together; a token file is read into ``token``."""
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("tls_cert and tls_key go together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ConfigError("tls_client_ca (mutual TLS) needs tls_cert and tls_key")
        for name in ("token_file", "tls_cert", "tls_key", "tls_client_ca", "receipt_key"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, Path(value))
                if not Path(value).is_file():
                    raise ConfigError(f"{name}: no such file: {value}")
        if self.receipt_key is not None:
            try:
                object.__setattr__(self, "receipt_signer", ReceiptSigner.load(self.receipt_key))
            except ValueError as e:
                raise ConfigError(f"receipt_key: {e}") from None
        if self.token_file is not None and self.token is None:
            token = self.token_file.read_text().strip()
            if not token:
                raise ConfigError(f"token_file {self.token_file} is empty")
            object.__setattr__(self, "token", token)
        if self.token is not None and not self.token.strip():
            raise ConfigError("the token is empty")

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None


def _import_roots(value: Any, store: Path) -> tuple[Path, ...]:
    """Import roots as real, existing directories, none overlapping the store."""
    if isinstance(value, (str, os.PathLike)):
        value = [v for v in str(value).split(os.pathsep) if v]
    roots = []
    real_store = Path(os.path.realpath(store))
    for v in value or ():
        root = Path(os.path.realpath(Path(v).expanduser()))
        if not root.is_dir():
            raise ConfigError(f"import_roots: not a directory: {v}")
        if root == real_store or root in real_store.parents or real_store in root.parents:
            raise ConfigError(f"import_roots: {v} overlaps the store {store}; the store must never be an import source")
        roots.append(root)
    return tuple(dict.fromkeys(roots))


def _coerce(value: Any, annotation: str, name: str) -> Any:
    if value is None:
        return None
    try:
        if annotation.startswith("int"):
            return int(value)
        if annotation.startswith("float"):
            return float(value)
        if annotation.startswith("bool"):
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: expected {annotation.split(' ')[0]}, got {value!r}") from None
    return value


def _build(cls, values: Mapping[str, Any], prefix: str = ""):
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"unknown setting(s): {', '.join(prefix + u for u in unknown)}")
    kwargs = {}
    for key, value in values.items():
        annotation = str(known[key].type)
        if key in ("erase", "base_models", "vllm_urls", "import_roots"):
            kwargs[key] = value
        elif annotation.startswith(("int", "float", "bool")):
            kwargs[key] = _coerce(value, annotation, prefix + key)
        else:
            kwargs[key] = value
    return cls(**kwargs)


ENV_PREFIX = "ERASER_"


def load_config(overrides: Mapping[str, Any] | None = None, config_file: str | os.PathLike | None = None,
                environ: Mapping[str, str] | None = None) -> SidecarConfig:
    """Defaults < YAML file < ERASER_* environment < ``overrides`` (command-line flags)."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    config_file = config_file or environ.get(ENV_PREFIX + "CONFIG")
    if config_file:
        path = Path(config_file)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping of settings")
        values.update({k.replace("-", "_"): v for k, v in loaded.items()})
    for f in fields(SidecarConfig):
        if f.name in ("erase", "base_models"):
            continue
        env = environ.get(ENV_PREFIX + f.name.upper())
        if env is not None and env != "":
            values[f.name] = env
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    if "store" not in values:
        raise ConfigError("no store directory: pass --store, set ERASER_STORE, or put store: in the config file")
    return _build(SidecarConfig, values)
