"""Settings: defaults here, then a TOML file, then EMBERD_* environment variables, then flags.

Everything is read and validated once, in `load_settings`; the rest of the daemon receives a frozen
`Settings` and never reads the environment itself.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from daemon.errors import InvalidConfig

DEFAULT_PORT = 11434

# One Go duration component: a number and a unit ("1.5h", "300ms", "2us").
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_UNIT_SECONDS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "μs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}


def parse_go_duration_s(text: str) -> float:
    """Parse a Go duration string ("5m", "1h30m", "-1m", "300ms", "0") into seconds.

    Raises ValueError with Go's own wording, which Ollama clients already know.
    """
    original = text
    sign = 1.0
    if text and text[0] in "+-":
        sign = -1.0 if text[0] == "-" else 1.0
        text = text[1:]
    if text == "0":
        return 0.0
    if not text:
        raise ValueError(f'time: invalid duration "{original}"')
    total_s = 0.0
    position = 0
    while position < len(text):
        match = _DURATION_PART.match(text, position)
        if match is None:
            if re.fullmatch(r"[\d.]+", text[position:]):
                raise ValueError(f'time: missing unit in duration "{original}"')
            raise ValueError(f'time: invalid duration "{original}"')
        total_s += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        position = match.end()
    return sign * total_s


_SIZE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([KMGT]i?B?|B)?", re.IGNORECASE)
_SIZE_FACTORS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size_bytes(text: str) -> int:
    """ "4GiB", "4G" (binary, as systemd's MemoryMax= reads it), "4GB" (decimal), "512MiB", "0"."""
    match = _SIZE.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"invalid size {text!r}: use a number of bytes or a unit such as 512MiB or 4GiB")
    number, unit = float(match.group(1)), (match.group(2) or "").lower()
    if len(unit) == 2 and unit[1] == "b" and unit[0] != "i":  # KB, MB, GB, TB: powers of 1000
        return int(number * 1000 ** ("kmgt".index(unit[0]) + 1))
    return int(number * _SIZE_FACTORS[unit[:1]])


def parse_host(text: str) -> tuple[str, int]:
    """Parse OLLAMA_HOST-style "host[:port]" (also "[::1]:port" and "http://host:port")."""
    value = text.strip()
    for scheme in ("http://", "https://"):
        if value.startswith(scheme):
            value = value[len(scheme) :]
    value = value.rstrip("/")
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        port_text = rest.removeprefix(":")
    elif value.count(":") == 1:
        host, port_text = value.split(":")
    else:
        host, port_text = value, ""
    host = host or "127.0.0.1"
    try:
        port = int(port_text) if port_text else DEFAULT_PORT
    except ValueError:
        raise InvalidConfig(f"host: invalid port in {text!r}") from None
    if not 0 <= port <= 65535:
        raise InvalidConfig(f"host: port out of range in {text!r}")
    return host, port


def default_home(environ: Mapping[str, str]) -> Path:
    data_home = environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data_home) / "emberd"


@dataclass(frozen=True)
class Settings:
    """Every setting of configs/emberd.toml, with its default. Units are in the names."""

    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    home: Path = dataclasses.field(default_factory=lambda: default_home({}))
    # Default keep_alive of a model after its last request; negative keeps it loaded forever.
    keep_alive_s: float = 300.0
    # Requests accepted (waiting or running) before new ones get 503.
    max_queue: int = 512
    # Loaded models at once; 0 means "as many as memory allows".
    max_loaded_models: int = 0
    # Memory kept free for the rest of the machine when deciding whether a model fits (inside a
    # cgroup limit, the limit is the budget and this does not shrink it).
    memory_reserve_mib: int = 512
    # The most the runners together may hold; 0 means no cap beyond the machine and the cgroup.
    max_memory_bytes: int = 0
    # llama.cpp threads per runner; 0 means automatic: busy runners share the CPUs.
    num_thread: int = 0
    # Token budget of one llama.cpp decode; 0 means automatic (options.auto_batch_tokens).
    batch_tokens: int = 0
    # A second, one-thread llama.cpp context per runner that embeds short inputs while a long decode
    # runs (a search query beside documents being indexed); about 9 MiB for all-MiniLM.
    quick_lane: bool = True
    # Context per sequence; 0 means the model's trained context.
    num_ctx: int = 0
    # Layers offloaded to a GPU; -1 means all (a CPU-only build ignores it).
    num_gpu: int = -1
    main_gpu: int = 0
    use_mmap: bool = True
    load_timeout_s: float = 120.0
    # The whole shutdown budget after SIGTERM/SIGINT: lame duck, drain, cancelled jobs, runners.
    # systemd's TimeoutStopSec (45s in the shipped unit) must exceed it.
    shutdown_timeout_s: float = 30.0
    # After SIGTERM, /readyz answers 503 while emberd keeps serving for this long, so a load
    # balancer stops sending before the listener closes. 0 closes it at once.
    drain_delay_s: float = 0.0
    # Long jobs (downloads, hashing, conversions) running at once; more wait their turn. They have
    # their own threads, so they never hold up short requests.
    max_jobs: int = 2
    # Largest request body (aiohttp's client_max_size); more gets 413.
    max_body_bytes: int = 32 * 1024 * 1024
    # The request bodies held at once, declared (Content-Length) or read so far (chunked): a request
    # whose body would pass it gets 503 with Retry-After before its body is read. At least
    # max_body_bytes; 0 means no budget.
    bodies_in_flight_bytes: int = 128 * 1024 * 1024
    # The most inputs one request may carry (OpenAI's own limit; LangChain sends at most 1000).
    max_inputs: int = 2048
    # The most tokens one request may hold, bounded before anything is tokenized (an input's UTF-8
    # bytes and special tokens, at most its context unless split_long_inputs): more gets 413. The
    # default admits max_inputs inputs of 8,192 tokens, the longest context of the models aliased.
    max_request_tokens: int = 2048 * 8192
    log_level: str = "info"
    # "text" or "json" (one object a line, for journald and Loki).
    log_format: str = "text"
    # A file with one API key a line, re-read on SIGHUP; "" means no keys are needed.
    api_keys_file: str = ""
    # Host headers accepted besides localhost, 127.0.0.1 and [::1] while bound to loopback.
    allowed_hosts: tuple[str, ...] = ()
    # Origins a browser may call emberd from (CORS); empty means CORS is off.
    cors_origins: tuple[str, ...] = ()
    # /api/embed on a model that is not local pulls it (when its name resolves on the Hub).
    auto_pull: bool = False
    # Model aliases (name -> Hub repo, file, revision, sha256); "" means configs/models.toml.
    models_file: str = ""
    # The Hugging Face Hub: "" means huggingface_hub's default (HF_ENDPOINT is honoured too).
    hub_endpoint: str = ""
    # Never contact the Hub (HF_HUB_OFFLINE=1 is honoured too).
    hub_offline: bool = False
    # What token ids sent to /v1/embeddings mean: "cl100k_base" (OpenAI's tokenizer, which OpenAI
    # clients such as LangChain use: decoded, then tokenized by the model) or "model" (ids of the
    # model's own vocabulary, as llama.cpp's server reads them).
    openai_token_ids: str = "cl100k_base"


_DURATION_SETTINGS = {"keep_alive_s", "load_timeout_s", "shutdown_timeout_s", "drain_delay_s"}
_SIZE_SETTINGS = {"max_memory_bytes", "bodies_in_flight_bytes"}
_FILE_KEYS = {
    # The file and the environment use the names people type: durations drop the "_s", sizes
    # (which take units) the "_bytes".
    (
        f.name.removesuffix("_s")
        if f.name in _DURATION_SETTINGS
        else f.name.removesuffix("_bytes")
        if f.name in _SIZE_SETTINGS
        else f.name
    ): f.name
    for f in fields(Settings)
    if f.name != "port"
}


def _coerce(name: str, raw: Any, from_text: bool, environ: Mapping[str, str]) -> Any:
    """Turn a raw value (TOML value or environment text) into the setting's type."""
    if name in _DURATION_SETTINGS:
        if isinstance(raw, bool):
            raise InvalidConfig(f"{name}: expected a duration, got {raw!r}")
        if isinstance(raw, (int, float)):
            return float(raw)
        if isinstance(raw, str):
            text = raw.strip()
            if from_text and re.fullmatch(r"-?\d+(\.\d+)?", text):
                return float(text)
            try:
                return parse_go_duration_s(text)
            except ValueError as error:
                raise InvalidConfig(f"{name}: {error}") from None
        raise InvalidConfig(f"{name}: expected a duration, got {raw!r}")
    if name in _SIZE_SETTINGS:
        if isinstance(raw, int) and not isinstance(raw, bool):
            return raw
        if isinstance(raw, str):
            try:
                return parse_size_bytes(raw)
            except ValueError as error:
                raise InvalidConfig(f"{name.removesuffix('_bytes')}: {error}") from None
        raise InvalidConfig(f"{name.removesuffix('_bytes')}: expected a size, got {raw!r}")
    field_type = {f.name: f.type for f in fields(Settings)}[name]
    if field_type == "bool":
        if isinstance(raw, bool):
            return raw
        if from_text and str(raw).strip().lower() in {"1", "true", "yes", "on"}:
            return True
        if from_text and str(raw).strip().lower() in {"0", "false", "no", "off"}:
            return False
        raise InvalidConfig(f"{name}: expected true or false, got {raw!r}")
    if field_type == "int":
        if isinstance(raw, int) and not isinstance(raw, bool):
            return raw
        if from_text:
            try:
                return int(str(raw).strip())
            except ValueError:
                pass
        raise InvalidConfig(f"{name}: expected an integer, got {raw!r}")
    if field_type == "tuple[str, ...]":
        # A TOML array of strings, or comma-separated text in an environment variable.
        items = raw.split(",") if isinstance(raw, str) and from_text else raw
        if isinstance(items, list | tuple) and all(isinstance(item, str) for item in items):
            return tuple(item.strip() for item in items if item.strip())
        raise InvalidConfig(f"{name}: expected a list of strings, got {raw!r}")
    if field_type == "Path":
        if isinstance(raw, str):
            return Path(raw).expanduser() if raw else default_home(environ)
        raise InvalidConfig(f"{name}: expected a path, got {raw!r}")
    if isinstance(raw, str):
        return raw
    raise InvalidConfig(f"{name}: expected a string, got {raw!r}")


def _validate(settings: Settings) -> Settings:
    positive = {
        "max_queue": settings.max_queue,
        "max_jobs": settings.max_jobs,
        "max_inputs": settings.max_inputs,
        "max_request_tokens": settings.max_request_tokens,
    }
    for name, value in positive.items():
        if value <= 0:
            raise InvalidConfig(f"{name}: must be positive, got {value}")
    non_negative = {
        "max_loaded_models": settings.max_loaded_models,
        "batch_tokens": settings.batch_tokens,
        "num_thread": settings.num_thread,
        "num_ctx": settings.num_ctx,
        "memory_reserve_mib": settings.memory_reserve_mib,
        "max_memory": settings.max_memory_bytes,
        "max_body_bytes": settings.max_body_bytes,
        "bodies_in_flight": settings.bodies_in_flight_bytes,
    }
    for name, value in non_negative.items():
        if value < 0:
            raise InvalidConfig(f"{name}: must not be negative, got {value}")
    # A budget smaller than the largest body would refuse that body forever, however idle emberd is.
    if settings.bodies_in_flight_bytes and not 0 < settings.max_body_bytes <= settings.bodies_in_flight_bytes:
        raise InvalidConfig(
            f"bodies_in_flight ({settings.bodies_in_flight_bytes} bytes) must be at least max_body_bytes "
            f"({settings.max_body_bytes}, and not 0: no limit), or 0 for no budget"
        )
    if settings.load_timeout_s <= 0 or settings.shutdown_timeout_s < 0:
        raise InvalidConfig("load_timeout must be positive and shutdown_timeout not negative")
    if not 0 <= settings.drain_delay_s < max(settings.shutdown_timeout_s, 1e-9):
        raise InvalidConfig("drain_delay must be shorter than shutdown_timeout, which includes it")
    if settings.log_format not in {"text", "json"}:
        raise InvalidConfig(f"log_format: expected text or json, got {settings.log_format!r}")
    if settings.openai_token_ids not in {"cl100k_base", "model"}:
        raise InvalidConfig(f"openai_token_ids: expected cl100k_base or model, got {settings.openai_token_ids!r}")
    if settings.log_level.lower() not in {"debug", "info", "warning", "error"}:
        raise InvalidConfig(f"log_level: expected debug, info, warning or error, got {settings.log_level!r}")
    return settings


# Variables named EMBERD_* that are not settings but are documented elsewhere: the file of settings,
# and configs/haproxy.cfg's own (read by HAProxy, often set in the same environment).
_OTHER_ENVIRONMENT = {"EMBERD_CONFIG"}
_OTHER_ENVIRONMENT_PREFIXES = ("EMBERD_LB_", "EMBERD_BACKEND_")


def unknown_environment_settings(environ: Mapping[str, str]) -> list[str]:
    """A warning for each EMBERD_* variable that is no setting (a typo such as EMBERD_KEEPALIVE
    would otherwise be ignored without a word), naming the closest setting."""
    known = {f"EMBERD_{key.upper()}" for key in _FILE_KEYS} | _OTHER_ENVIRONMENT
    warnings = []
    for name in sorted(environ):
        if not name.startswith("EMBERD_") or name in known or name.startswith(_OTHER_ENVIRONMENT_PREFIXES):
            continue
        # Compared without the shared prefix, which would make every name look close.
        suffixes = sorted(known_name.removeprefix("EMBERD_") for known_name in known)
        closest = difflib.get_close_matches(name.removeprefix("EMBERD_"), suffixes, n=1, cutoff=0.6)
        hint = f"; did you mean EMBERD_{closest[0]}?" if closest else ""
        warnings.append(f"{name} is not an emberd setting and is ignored{hint}")
    return warnings


def load_settings(
    environ: Mapping[str, str],
    config_path: Path | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Build the daemon's settings: defaults < TOML file < EMBERD_* variables < `overrides` (flags).

    The file is `config_path`, else $EMBERD_CONFIG, else none (the defaults are the documented
    contents of configs/emberd.toml).
    """
    values: dict[str, Any] = {}
    path = config_path or (Path(environ["EMBERD_CONFIG"]) if environ.get("EMBERD_CONFIG") else None)
    if path is not None:
        try:
            document = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as error:
            raise InvalidConfig(f"cannot read config file {path}: {error}") from None
        for key, raw in document.items():
            if key not in _FILE_KEYS:
                raise InvalidConfig(f"{path}: unknown setting {key!r}")
            values[key] = (raw, False)
    # huggingface_hub's own variables, so a machine set up for it needs nothing more.
    if environ.get("HF_ENDPOINT"):
        values["hub_endpoint"] = (environ["HF_ENDPOINT"], True)
    if environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}:
        values["hub_offline"] = (True, False)
    for key in _FILE_KEYS:
        env_value = environ.get(f"EMBERD_{key.upper()}")
        if env_value is not None and env_value != "":
            values[key] = (env_value, True)
    for key, raw in (overrides or {}).items():
        if raw is not None:
            values[key] = (raw, isinstance(raw, str))
    kwargs: dict[str, Any] = {"home": default_home(environ)}
    for key, (raw, from_text) in values.items():
        if key == "host":
            host, port = parse_host(str(raw))
            kwargs["host"], kwargs["port"] = host, port
            continue
        name = _FILE_KEYS[key]
        kwargs[name] = _coerce(name, raw, from_text, environ)
    return _validate(Settings(**kwargs))
