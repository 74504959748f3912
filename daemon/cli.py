"""`emberd serve|create|pull|list|show|rm|ps|embed|stop|batch`. Everything but `serve` is an HTTP
client of the daemon."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from daemon import __version__
from daemon.config import Settings, load_settings, unknown_environment_settings
from daemon.errors import EmberdError
from daemon.logs import configure_logging
from daemon.prompts import parse_prompt_option


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="emberd", description="Local embedding daemon (Ollama API, llama.cpp).")
    parser.add_argument("--version", action="version", version=f"emberd {__version__}")
    host_help = "daemon address host:port (default: EMBERD_HOST or 127.0.0.1:11434)"
    parser.add_argument("--host", help=host_help)
    # `emberd list --host H` as well as `emberd --host H list`: every verb takes it too (SUPPRESS:
    # not given after the verb, the one before it stands).
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--host", default=argparse.SUPPRESS, help=host_help)
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return commands.add_parser(name, help=help, parents=[common])

    serve_parser = command("serve", help="run the daemon")
    serve_parser.add_argument("--config", type=Path, help="settings file (default: EMBERD_CONFIG)")
    serve_parser.add_argument("--home", help="model store and state (default: EMBERD_HOME)")
    serve_parser.add_argument("--log-level", help="debug, info, warning or error")
    serve_parser.add_argument("--log-format", help="text or json")
    serve_parser.add_argument(
        "--ensure-model",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="create NAME from PATH (GGUF or Hugging Face directory) before serving, if missing",
    )

    create_parser = command("create", help="register a GGUF file or convert a model directory")
    create_parser.add_argument("name")
    create_parser.add_argument("--from", dest="source", required=True, help="GGUF file or Hugging Face directory")
    create_parser.add_argument("--quantize", help="f16 (default), f32, bf16 or q8_0, for directories")
    create_parser.add_argument(
        "--prompt",
        action="append",
        default=[],
        metavar="NAME=TEXT",
        help='a named prompt requests can pick with prompt_name, e.g. --prompt "query=search_query: "',
    )
    create_parser.add_argument("--default-prompt", metavar="NAME", help="the prompt applied when a request names none")
    create_parser.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="[TASK=]PATH",
        help="a task adapter (LoRA GGUF, e.g. lora-retrieval.query-*.gguf); its task from its header unless named",
    )
    create_parser.add_argument("--default-task", metavar="TASK", help="the task applied when a request names none")

    embed_parser = command("embed", help="embed texts and print the JSON answer")
    embed_parser.add_argument("name")
    embed_parser.add_argument("texts", nargs="+")

    pull_parser = command("pull", help="download a model from the Hugging Face Hub")
    pull_parser.add_argument("name", help="an alias (configs/models.toml) or hf.co/{owner}/{repo}[:{quant}]")
    show_parser = command("show", help="a model's details and GGUF metadata")
    show_parser.add_argument("name")
    rm_parser = command("rm", help="remove a model (unloading it first)")
    rm_parser.add_argument("name")

    batch_parser = command("batch", help="embed a file as a batch job, with a progress bar; output beside it")
    batch_parser.add_argument("file", nargs="?", type=Path, help="JSONL of /v1/embeddings requests, or texts a line")
    batch_parser.add_argument("--model", help="the model for a file of plain texts")
    batch_parser.add_argument("--status", metavar="ID", help="print a batch")
    batch_parser.add_argument("--cancel", metavar="ID", help="cancel a batch (what is done is kept)")

    command("list", help="models in the store")
    command("ps", help="loaded models")
    stop_parser = command("stop", help="unload a model")
    stop_parser.add_argument("name")
    return parser


class _Client:
    def __init__(self, settings: Settings) -> None:
        host = "127.0.0.1" if settings.host in ("0.0.0.0", "::", "") else settings.host
        host = f"[{host}]" if ":" in host else host
        self.base_url = f"http://{host}:{settings.port}"

    def _open(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.base_url + path, data=data, method=method)
        request.add_header("Content-Type", "application/json")
        try:
            return urllib.request.urlopen(request)
        except urllib.error.HTTPError as error:
            message = error.read().decode(errors="replace")
            with contextlib.suppress(ValueError, KeyError, TypeError):
                message = json.loads(message)["error"]
            raise SystemExit(f"Error: {message}") from None
        except urllib.error.URLError as error:
            raise SystemExit(f"Error: cannot reach emberd at {self.base_url}: {error.reason}") from None

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        with self._open(method, path, body) as response:
            return json.loads(response.read() or b"null")

    def stream(self, path: str, body: dict[str, Any]) -> None:
        """Print NDJSON progress: status lines, and one redrawn bar per downloading file."""
        bar_open = False
        with self._open("POST", path, body) as response:
            for line in response:
                message = json.loads(line)
                if "error" in message:
                    raise SystemExit(("\n" if bar_open else "") + f"Error: {message['error']}")
                if "total" in message:
                    sys.stdout.write("\r" + progress_line(message["status"], message["completed"], message["total"]))
                    bar_open = True
                else:
                    print(("\n" if bar_open else "") + message.get("status", ""))
                    bar_open = False
                sys.stdout.flush()


def parse_adapter_option(text: str) -> tuple[str | None, str]:
    """`--adapter PATH` or `--adapter TASK=PATH` as (TASK or None, PATH); a path with '=' in a folder
    name before it is a path."""
    task, separator, path = text.partition("=")
    if separator and task and "/" not in task:
        return task, path
    return None, text


def progress_line(status: str, completed: int, total: int, width: int = 30) -> str:
    fraction = completed / total if total else 1.0
    filled = int(fraction * width)
    return (
        f"{status} {fraction:4.0%} [{'#' * filled}{'.' * (width - filled)}] {completed / 1e6:.1f}/{total / 1e6:.1f} MB"
    )


def _print_table(rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=False)).rstrip())


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    overrides: dict[str, Any] = {"host": args.host}
    if args.command == "serve":
        overrides.update(home=args.home, log_level=args.log_level, log_format=args.log_format)
    try:
        settings = load_settings(os.environ, getattr(args, "config", None), overrides)
    except EmberdError as error:
        print(f"Error: {error.message}", file=sys.stderr)
        return 2

    if args.command == "serve":
        configure_logging(settings.log_level, settings.log_format)
        for warning in unknown_environment_settings(os.environ):
            logging.getLogger("daemon.config").warning("%s", warning)
        wanted = []
        for item in args.ensure_model:
            name, separator, path = item.partition("=")
            if not separator:
                print(f"Error: --ensure-model expects NAME=PATH, got {item!r}", file=sys.stderr)
                return 2
            wanted.append((name, Path(path)))
        from daemon.service import SystemdLink, return_large_blocks_when_freed, serve  # for `serve` alone

        return_large_blocks_when_freed(os.environ)

        try:
            return asyncio.run(serve(settings, wanted, SystemdLink.from_environment(os.environ)))
        except EmberdError as error:  # a setting found unusable at start, such as api_keys_file
            print(f"Error: {error.message}", file=sys.stderr)
            return 2

    client = _Client(settings)
    if args.command == "create":
        body: dict[str, Any] = {"model": args.name, "from": str(Path(args.source).resolve())}
        if args.quantize:
            body["quantize"] = args.quantize
        if args.prompt:
            try:
                body["prompts"] = dict(parse_prompt_option(option) for option in args.prompt)
            except EmberdError as error:
                raise SystemExit(f"Error: {error.message}") from None
        if args.default_prompt:
            body["default_prompt_name"] = args.default_prompt
        if args.adapter:
            sources = [parse_adapter_option(option) for option in args.adapter]
            if all(task is None for task, _path in sources):
                body["adapters"] = [str(Path(path).resolve()) for _task, path in sources]
            elif all(task is not None for task, _path in sources):
                body["adapters"] = {task: str(Path(path).resolve()) for task, path in sources}
            else:
                raise SystemExit("Error: name the task of every --adapter (TASK=PATH), or of none")
        if args.default_task:
            body["default_task"] = args.default_task
        client.stream("/api/create", body)
    elif args.command == "pull":
        client.stream("/api/pull", {"model": args.name})
    elif args.command == "show":
        print(json.dumps(client.call("POST", "/api/show", {"model": args.name}), indent=2))
    elif args.command == "rm":
        client.call("DELETE", "/api/delete", {"model": args.name})
        print(f"deleted '{args.name}'")
    elif args.command == "embed":
        print(json.dumps(client.call("POST", "/api/embed", {"model": args.name, "input": args.texts})))
    elif args.command == "list":
        models = client.call("GET", "/api/tags")["models"]
        rows = [[m["name"], m["digest"][:12], f"{m['size'] / 1e6:.0f} MB", m["modified_at"][:19]] for m in models]
        _print_table(rows, ["NAME", "ID", "SIZE", "MODIFIED"])
    elif args.command == "ps":
        models = client.call("GET", "/api/ps")["models"]
        rows = [[m["name"], m["digest"][:12], f"{m['size'] / 1e6:.0f} MB", m["expires_at"][:19]] for m in models]
        _print_table(rows, ["NAME", "ID", "SIZE", "UNTIL"])
    elif args.command == "stop":
        client.call("POST", "/api/embed", {"model": args.name, "keep_alive": 0})
    elif args.command == "batch":
        from daemon import batch_cli  # httpx and tqdm, for this verb alone

        return batch_cli.run(client.base_url, args.file, args.model, args.status, args.cancel)
    return 0
