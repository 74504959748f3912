"""Settings: defaults here, then a TOML file, then EMBERD_* environment variables, then flags.

Each setting is declared once, as a field of `Settings` with its `Declared` (file key, kind, unit,
help): the loader, the EMBERD_* names, the warning for unknown ones, configs/emberd.toml and
docs/configuration.md's table all come from it. Everything is read and validated once, in
`load_settings`; the rest of the daemon receives a frozen `Settings` and never reads the
environment itself.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

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


def format_go_duration(seconds: float) -> str:
    """Seconds as the Go duration people write ("5m", "1h30m", "30s", "0s"): what
    `parse_go_duration_s` reads back. The documents show defaults this way."""
    if seconds == 0:
        return "0s"
    hours, rest_s = divmod(abs(seconds), 3600.0)
    minutes, rest_s = divmod(rest_s, 60.0)
    parts = [f"{hours:.0f}h" if hours else "", f"{minutes:.0f}m" if minutes else "", f"{rest_s:g}s" if rest_s else ""]
    return ("-" if seconds < 0 else "") + "".join(parts)


def format_size(size_bytes: int) -> str:
    """Bytes in the largest binary unit that holds them whole ("128MiB", "4GiB"; "0", "1000"): what
    `parse_size_bytes` reads back."""
    for unit, factor in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size_bytes and size_bytes % factor == 0:
            return f"{size_bytes // factor}{unit}"
    return str(size_bytes)


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


# How a setting is written in the file and the environment; the loader parses each kind one way.
Kind = Literal["host", "path", "duration", "size", "integer", "boolean", "text", "list"]


@dataclass(frozen=True)
class Declared:
    """How one field of `Settings` is set and documented. The field gives its name, type and default;
    configs/emberd.toml and docs/configuration.md's table are generated from these
    (`python -m daemon.config_docs --write`), and tests/test_config.py fails when they differ."""

    # The file's key; the environment variable is EMBERD_ and the key in upper case.
    key: str
    kind: Kind
    # What the field's number counts ("s", "bytes", "MiB", "tokens", ...); "" for none.
    unit: str
    # The comment above the key in configs/emberd.toml: plain text, "\n" starts a new line.
    help: str
    # The table's "meaning" (Markdown), one short line.
    summary: str
    # The table's default when the field's own stands for something else ("" meaning a default path).
    shown_default: str = ""
    # Another program's variable read as well, below EMBERD_* (huggingface_hub's HF_ENDPOINT).
    also_env: str = ""

    @property
    def variable(self) -> str:
        return f"EMBERD_{self.key.upper()}"


def setting(
    default: Any,
    *,
    key: str,
    kind: Kind,
    help: str,
    summary: str,
    unit: str = "",
    shown_default: str = "",
    also_env: str = "",
) -> Any:
    """A field of `Settings` with its declaration (a callable default is a factory, as for `home`)."""
    metadata = {"setting": Declared(key, kind, unit, help, summary, shown_default, also_env)}
    if callable(default):
        return dataclasses.field(default_factory=default, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@dataclass(frozen=True)
class Settings:
    """Every setting, declared once: name, type and default here, the rest in its `Declared`. Units
    are in the names. The file and the environment use the names people type: durations drop the
    "_s", sizes (which take units) the "_bytes"."""

    host: str = setting(
        "127.0.0.1",
        key="host",
        kind="host",
        summary="listen address",
        help='Address to listen on, host:port (also "[::1]:11434").',
    )
    # Not a setting of its own: `host` carries it.
    port: int = DEFAULT_PORT
    # `setting` returns a dataclasses.field whose factory runs at each construction, as RUF009 wants.
    home: Path = setting(  # noqa: RUF009
        lambda: default_home({}),
        key="home",
        kind="path",
        summary="model store (`models/blobs`, `models/manifests`) and `tmp/`",
        help='Model store and state. "" means $XDG_DATA_HOME/emberd, i.e. ~/.local/share/emberd.',
        shown_default="`~/.local/share/emberd`",
    )
    keep_alive_s: float = setting(
        300.0,
        key="keep_alive",
        kind="duration",
        unit="s",
        summary="how long an idle model stays loaded (negative = forever)",
        help="How long a model stays loaded after its last request, unless a request says otherwise: a Go "
        'duration ("5m", "1h30m") or seconds; negative keeps it loaded forever, 0 unloads at once.',
    )
    max_queue: int = setting(
        512,
        key="max_queue",
        kind="integer",
        unit="requests",
        summary="requests accepted at once (waiting or running); more get 503",
        help='Requests accepted at once (waiting or running); more get 503 "server busy". Back-pressure '
        "happens before any work is done.",
    )
    max_loaded_models: int = setting(
        0,
        key="max_loaded_models",
        kind="integer",
        unit="models",
        summary="0 = as many as memory allows",
        help="Models loaded at once; 0 means as many as memory allows (idle models are evicted first).",
    )
    memory_reserve_mib: int = setting(
        512,
        key="memory_reserve_mib",
        kind="integer",
        unit="MiB",
        summary="memory left for the rest of the machine (not taken from a cgroup limit)",
        help="Memory left free for the rest of the machine when deciding whether a model fits, in MiB.\n"
        "Inside a cgroup limit (systemd's MemoryMax=, a container's), the limit is the budget instead.",
    )
    max_memory_bytes: int = setting(
        0,
        key="max_memory",
        kind="size",
        unit="bytes",
        summary="the most the runners together may hold (`4GiB`, `512MiB`); 0 = no cap",
        help='The most the model runners together may hold ("4GiB", "512MiB"; "4G" is binary, "4GB" '
        "decimal).\n\"0\" means no cap beyond the machine's memory and the service's cgroup limit.",
    )
    max_gpu_memory_bytes: int = setting(
        0,
        key="max_gpu_memory",
        kind="size",
        unit="bytes",
        summary="the most the runners may hold on each GPU (`24MiB`, `6GiB`); 0 = what the device reports",
        help='The most the model runners together may hold on each GPU device ("6GiB", "24MiB"), for a '
        'GPU shared with other programs.\n"0" means no cap beyond the free memory the device reports.',
    )
    num_thread: int = setting(
        0,
        key="num_thread",
        kind="integer",
        unit="threads",
        summary="llama.cpp threads per runner; 0 = automatic: busy runners share the CPUs",
        help="llama.cpp threads per runner; 0 means automatic: the runners busy at a time share the CPUs "
        "this process may use (a runner working alone gets them all).",
    )
    batch_tokens: int = setting(
        0,
        key="batch_tokens",
        kind="integer",
        unit="tokens",
        summary="token budget of one llama.cpp decode; 0: automatic, 512 halved while the output buffer "
        "(n_vocab floats a token) passes 32 MiB, at least 128 (256 for all-MiniLM)",
        help="Token budget of one llama.cpp decode, shared by the inputs of concurrent requests (a "
        "request's options.num_batch overrides it); 0 means automatic: 512 tokens, halved while "
        "llama.cpp's output buffer (n_vocab floats per decoded token) would pass 32 MiB, at least 128 "
        "(256 for all-MiniLM). Attention cost grows with its square, so bigger is not faster: measured "
        "with `make bench`.",
    )
    quick_lane: bool = setting(
        True,
        key="quick_lane",
        kind="boolean",
        summary="a second, one-thread context per model embeds short inputs while a long decode runs",
        help="A second, one-thread llama.cpp context per model that embeds short inputs (32 tokens or "
        "fewer) while a long decode runs, so a query does not wait for a document being indexed. About "
        "9 MiB for all-MiniLM.",
    )
    num_ctx: int = setting(
        0,
        key="num_ctx",
        kind="integer",
        unit="tokens",
        summary="context per input; 0 = the model's trained context",
        help="Context per input in tokens; 0 means the model's trained context (no hidden 2048 cap).",
    )
    num_gpu: int = setting(
        -1,
        key="num_gpu",
        kind="integer",
        unit="layers",
        summary="layers offloaded to a GPU; -1 = as many as fit",
        help="Layers offloaded to the GPU; -1 means automatic: all of them when the device holds them, "
        "else as many as fit, the rest on the CPU.\nA number asks for exactly that many (507 when they "
        "do not fit). A CPU-only llama.cpp build ignores it.",
    )
    main_gpu: int = setting(
        0,
        key="main_gpu",
        kind="integer",
        summary="the GPU that holds the model when there are several",
        help="GPU that holds the model when there are several.",
    )
    use_mmap: bool = setting(
        True,
        key="use_mmap",
        kind="boolean",
        summary="map model files instead of reading them into memory",
        help="Map model files instead of reading them into memory.",
    )
    load_timeout_s: float = setting(
        120.0,
        key="load_timeout",
        kind="duration",
        unit="s",
        summary="how long a model may take to load",
        help="How long a model may take to load before the request fails.",
    )
    shutdown_timeout_s: float = setting(
        30.0,
        key="shutdown_timeout",
        kind="duration",
        unit="s",
        summary="the whole shutdown after SIGTERM/SIGINT (see [Run as a service](service.md#run-as-a-service))",
        help="The whole shutdown after SIGTERM or SIGINT (a second one exits at once): the lame-duck "
        "delay, answering every accepted request, stopping pulls and conversions at their next chunk, "
        "stopping the runners. The shipped systemd unit's TimeoutStopSec (45s) leaves a 15s margin "
        "over it.",
    )
    drain_delay_s: float = setting(
        0.0,
        key="drain_delay",
        kind="duration",
        unit="s",
        summary="after a stop signal, keep serving this long while `/readyz` says 503 (for load balancers)",
        help="After a stop signal, /readyz answers 503 while emberd keeps serving for this long, so a "
        "load balancer checking /readyz stops sending before the listener closes. Part of "
        "shutdown_timeout.",
    )
    max_jobs: int = setting(
        2,
        key="max_jobs",
        kind="integer",
        unit="jobs",
        summary="downloads and conversions at once, on threads of their own",
        help="Long jobs (downloads, hashing, conversions) at once; more wait their turn. They run on "
        "threads of their own, so they never hold up short requests.",
    )
    max_body_bytes: int = setting(
        32 * 1024 * 1024,
        key="max_body_bytes",
        kind="integer",
        unit="bytes",
        summary="largest request body; more gets 413",
        help="Largest request body, in bytes; a larger one gets 413.",
    )
    max_upload_bytes: int = setting(
        512 * 1024 * 1024,
        key="max_upload_bytes",
        kind="size",
        unit="bytes",
        summary="largest file `POST /v1/files` takes (batch input); more gets 413",
        help="Largest file an upload to /v1/files may be (a batch's input lines): it streams to disk, so this is "
        "not max_body_bytes; a larger one gets 413 and nothing is kept.",
    )
    batch_database_url: str = setting(
        "",
        key="batch_database_url",
        kind="text",
        summary="where batches live: empty = SQLite under EMBERD_HOME; postgresql://... = shared by a fleet",
        help="Where OpenAI-style batches (/v1/files, /v1/batches) live. Empty: SQLite in EMBERD_HOME/batches, "
        "this daemon's own. postgresql://user:password@host/db: batches, their files and output live in that "
        "database, every daemon given the same URL answers every batch route and takes chunks of every batch "
        "(the role must be allowed to create tables).",
    )
    batch_chunks_in_flight: int = setting(
        2,
        key="batch_chunks_in_flight",
        kind="integer",
        summary="chunks of batch lines a daemon embeds at once",
        help="How many chunks (64 lines each) of batch jobs this daemon embeds at once; they run below "
        "interactive requests. 0 leaves batches to the other daemons of a fleet.",
    )
    batch_lease_s: float = setting(
        120.0,
        key="batch_lease",
        kind="duration",
        unit="s",
        summary="how long a claimed chunk of batch lines is held",
        help="How long a daemon holds a chunk of batch lines it claimed: a daemon that dies mid-chunk leaves it "
        "to the others once this has passed (its own restart takes it back at once).",
    )
    bodies_in_flight_bytes: int = setting(
        128 * 1024 * 1024,
        key="bodies_in_flight",
        kind="size",
        unit="bytes",
        summary="request bodies being read at once, counted from Content-Length before any is read; past "
        "it 503 with `Retry-After` (0 = no budget)",
        help='The request bodies emberd holds at once ("128MiB"; "128M" is binary, "128MB" decimal): a '
        "request whose body (its Content-Length, or what a chunked body has sent so far) would pass it "
        "gets 503 with Retry-After before its body is read, so many large bodies at once cannot grow "
        'the daemon by their sum. At least max_body_bytes; "0" means no budget.',
    )
    max_inputs: int = setting(
        2048,
        key="max_inputs",
        kind="integer",
        unit="inputs",
        summary="inputs in one request; more get 413",
        help="The most inputs one request may carry; more get 413. OpenAI's API takes at most 2048, and "
        "LangChain's OpenAIEmbeddings sends 1000 a request, so clients written for it never exceed "
        "this.",
    )
    max_request_tokens: int = setting(
        2048 * 8192,
        key="max_request_tokens",
        kind="integer",
        unit="tokens",
        summary="tokens one request may make (2,048 inputs of an 8,192-token context), bounded from its "
        "UTF-8 bytes before anything is tokenized; more get 413 with the numbers",
        help="The most tokens one request may hold; more get 413, before anything is tokenized. A request "
        "is bounded by its inputs' UTF-8 bytes (no tokenizer makes more tokens of a text) plus their "
        "special tokens, each input at most its context unless split_long_inputs; /api/tokenize by its "
        "content, /api/detokenize by its ids. The default, 2048 x 8192, admits max_inputs inputs of a "
        "full 8,192-token context (bge-m3's, nomic-embed-text's), the largest a request for the models "
        "aliased here can hold.",
    )
    log_level: str = setting(
        "info",
        key="log_level",
        kind="text",
        summary="`debug`, `info`, `warning` or `error`",
        help="debug, info, warning or error.",
    )
    log_format: str = setting(
        "text",
        key="log_format",
        kind="text",
        summary="`text`, or `json`: one object a line",
        help='"text", or "json": one object a line, for journald and Loki. Each request gets one line '
        "(route, model, status, inputs, tokens, queue and inference ms); input text and keys are never "
        "logged.",
    )
    api_keys_file: str = setting(
        "",
        key="api_keys_file",
        kind="text",
        summary="one key a line; every route but `/`, `/healthz`, `/readyz` then needs `Authorization: Bearer KEY`",
        help="A file holding one API key a line (# starts a comment). When set, every route but /, "
        '/healthz and /readyz needs "Authorization: Bearer KEY", else 401. SIGHUP re-reads the file.',
    )
    allowed_hosts: tuple[str, ...] = setting(
        (),
        key="allowed_hosts",
        kind="list",
        summary="Host names accepted besides localhost, 127.0.0.1, [::1] while bound to loopback",
        help="While bound to loopback, requests whose Host header is not localhost, 127.0.0.1 or [::1] "
        "get 403: a web page cannot reach emberd through DNS rebinding. Names listed here are accepted "
        "too.",
    )
    cors_origins: tuple[str, ...] = setting(
        (),
        key="cors_origins",
        kind="list",
        summary="origins a browser page may call from (`*` for any); empty = CORS off",
        help='Origins a browser page may call emberd from (CORS). Empty means CORS is off; "*" allows '
        "any.\nWhatever this says, a request carrying another Origin gets 403 before its body is read, "
        "unless it is emberd's own origin or a loopback page (http://localhost:*, 127.0.0.1, [::1]).",
    )
    auto_pull: bool = setting(
        False,
        key="auto_pull",
        kind="boolean",
        summary="`/api/embed` pulls a missing model the Hub can provide",
        help="/api/embed on a model that is not in the store pulls it first (when its name resolves on "
        'the Hub), instead of answering 404 "try pulling it first".',
    )
    calibrate_on_store: bool = setting(
        True,
        key="calibrate_on_store",
        kind="boolean",
        summary="calibrate a model's int8/uint8 ranges when it is created or pulled",
        help="A model created or pulled is loaded once to calibrate the ranges its int8 and uint8 vectors "
        "use (embedding types, see docs/typed-vectors.md), kept in its manifest. Off: a model is "
        "calibrated at its first int8/uint8 request instead.",
    )
    models_file: str = setting(
        "",
        key="models_file",
        kind="text",
        summary="aliases",
        help="Aliases: model names -> an exact Hugging Face repo, file, revision and sha256.\n"
        '"" means configs/models.toml next to the daemon package.',
        shown_default="`configs/models.toml`",
    )
    hub_endpoint: str = setting(
        "",
        key="hub_endpoint",
        kind="text",
        summary="the Hub, or a mirror",
        help='The Hugging Face Hub endpoint; "" means huggingface_hub\'s default. HF_ENDPOINT is '
        "honoured too, and HF_TOKEN (for gated repos) is read by huggingface_hub itself.",
        shown_default="huggingface_hub's",
        also_env="HF_ENDPOINT",
    )
    hub_offline: bool = setting(
        False,
        key="hub_offline",
        kind="boolean",
        summary="never contact the Hub",
        help="Never contact the Hub; pulls fail at once. HF_HUB_OFFLINE=1 is honoured too.",
        also_env="HF_HUB_OFFLINE",
    )
    openai_token_ids: str = setting(
        "cl100k_base",
        key="openai_token_ids",
        kind="text",
        summary="what token ids sent to `/v1/embeddings` mean (`cl100k_base` or `model`)",
        help='What token ids sent to /v1/embeddings mean. "cl100k_base": OpenAI\'s tokenizer, which '
        "OpenAI clients (LangChain's OpenAIEmbeddings, ...) use to pre-tokenize; emberd decodes them "
        'and the model tokenizes the text, so the vectors equal those of the text. "model": ids of the '
        "model's own vocabulary, as llama.cpp's server reads them.",
    )
    cache: bool = setting(
        True,
        key="cache",
        kind="boolean",
        summary="vector cache: re-embedding an unchanged input (the same model and token ids) costs a lookup",
        help="The vector cache: a vector once computed is kept, keyed by the model's digest, the llama.cpp "
        "version, the task adapter and the exact token ids decoded, so embedding the same input again "
        "(re-indexing unchanged text) costs a lookup, and a request whose inputs are all cached loads no "
        "model. On disk under home (cache/vectors.sqlite3), or in cache_url's Redis.",
    )
    cache_max_bytes: int = setting(
        512 * 1024 * 1024,
        key="cache_max_bytes",
        kind="size",
        unit="bytes",
        summary="the keys and vectors the on-disk cache holds; least recently used out first",
        help='The keys and vectors the on-disk vector cache holds ("512MiB": about 330,000 vectors of 384 '
        "floats); past it the least recently used go first. The file is larger by SQLite's pages and "
        "index (about a sixth). Not used with cache_url: Redis's own maxmemory bounds it.",
    )
    cache_url: str = setting(
        "",
        key="cache_url",
        kind="text",
        summary='a shared Redis for a fleet (`redis://host:6379/0`); "" = the file under home',
        help='A Redis server shared by every daemon of a fleet ("redis://host:6379/0"), so a vector any of '
        "them computed serves them all; bound it with Redis's maxmemory and maxmemory-policy allkeys-lru. "
        '"" means the SQLite file under home. A Redis that cannot be reached makes every lookup a miss '
        "(logged), never a failed request.",
    )


# Every declared setting by its field's name, in the order of `Settings` (the file's order).
DECLARED: dict[str, Declared] = {f.name: f.metadata["setting"] for f in fields(Settings) if "setting" in f.metadata}
_FIELD_OF_KEY = {declared.key: name for name, declared in DECLARED.items()}

_TRUE_TEXT = {"1", "true", "yes", "on"}
_FALSE_TEXT = {"0", "false", "no", "off"}


def _coerce(declared: Declared, raw: Any, from_text: bool, environ: Mapping[str, str]) -> Any:
    """Turn a raw value (TOML value or environment text) into the setting's type."""
    key, kind = declared.key, declared.kind
    if kind == "duration":
        if isinstance(raw, bool):
            raise InvalidConfig(f"{key}: expected a duration, got {raw!r}")
        if isinstance(raw, (int, float)):
            return float(raw)
        if isinstance(raw, str):
            text = raw.strip()
            if from_text and re.fullmatch(r"-?\d+(\.\d+)?", text):
                return float(text)
            try:
                return parse_go_duration_s(text)
            except ValueError as error:
                raise InvalidConfig(f"{key}: {error}") from None
        raise InvalidConfig(f"{key}: expected a duration, got {raw!r}")
    if kind == "size":
        if isinstance(raw, int) and not isinstance(raw, bool):
            return raw
        if isinstance(raw, str):
            try:
                return parse_size_bytes(raw)
            except ValueError as error:
                raise InvalidConfig(f"{key}: {error}") from None
        raise InvalidConfig(f"{key}: expected a size, got {raw!r}")
    if kind == "boolean":
        if isinstance(raw, bool):
            return raw
        if from_text and str(raw).strip().lower() in _TRUE_TEXT:
            return True
        if from_text and str(raw).strip().lower() in _FALSE_TEXT:
            return False
        raise InvalidConfig(f"{key}: expected true or false, got {raw!r}")
    if kind == "integer":
        if isinstance(raw, int) and not isinstance(raw, bool):
            return raw
        if from_text:
            try:
                return int(str(raw).strip())
            except ValueError:
                pass
        raise InvalidConfig(f"{key}: expected an integer, got {raw!r}")
    if kind == "list":
        # A TOML array of strings, or comma-separated text in an environment variable.
        items = raw.split(",") if isinstance(raw, str) and from_text else raw
        if isinstance(items, list | tuple) and all(isinstance(item, str) for item in items):
            return tuple(item.strip() for item in items if item.strip())
        raise InvalidConfig(f"{key}: expected a list of strings, got {raw!r}")
    if kind == "path":
        if isinstance(raw, str):
            return Path(raw).expanduser() if raw else default_home(environ)
        raise InvalidConfig(f"{key}: expected a path, got {raw!r}")
    if isinstance(raw, str):
        return raw
    raise InvalidConfig(f"{key}: expected a string, got {raw!r}")


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
        "max_gpu_memory": settings.max_gpu_memory_bytes,
        "max_body_bytes": settings.max_body_bytes,
        "bodies_in_flight": settings.bodies_in_flight_bytes,
        "cache_max_bytes": settings.cache_max_bytes,
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
    if settings.cache_url and not settings.cache_url.startswith(("redis://", "rediss://", "unix://")):
        raise InvalidConfig(f"cache_url: expected redis://, rediss:// or unix://, got {settings.cache_url!r}")
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
    known = {declared.variable for declared in DECLARED.values()} | _OTHER_ENVIRONMENT
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
            if key not in _FIELD_OF_KEY:
                raise InvalidConfig(f"{path}: unknown setting {key!r}")
            values[key] = (raw, False)
    # Another program's variables (huggingface_hub's), so a machine set up for it needs nothing more.
    # Read as that program reads them: a boolean is only ever turned on, never refused.
    for declared in DECLARED.values():
        other_value = environ.get(declared.also_env) if declared.also_env else None
        if other_value and declared.kind == "boolean":
            if other_value.strip().lower() in _TRUE_TEXT:
                values[declared.key] = (True, False)
        elif other_value:
            values[declared.key] = (other_value, True)
    for declared in DECLARED.values():
        env_value = environ.get(declared.variable)
        if env_value is not None and env_value != "":
            values[declared.key] = (env_value, True)
    for key, raw in (overrides or {}).items():
        if raw is not None:
            values[key] = (raw, isinstance(raw, str))
    kwargs: dict[str, Any] = {"home": default_home(environ)}
    for key, (raw, from_text) in values.items():
        if key == "host":
            host, port = parse_host(str(raw))
            kwargs["host"], kwargs["port"] = host, port
            continue
        name = _FIELD_OF_KEY[key]
        kwargs[name] = _coerce(DECLARED[name], raw, from_text, environ)
    return _validate(Settings(**kwargs))
