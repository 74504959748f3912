"""A local server speaking the Hugging Face Hub's protocol, for what huggingface_hub asks of it:

    GET  /api/models/{repo}[/revision/{rev}]     model info, with LFS sha256 and size per file
    HEAD /{repo}/resolve/{rev}/{file}            302 to the CDN, X-Repo-Commit, X-Linked-Etag/-Size
    GET  /{repo}/resolve/{rev}/{file}            the same redirect
    GET  /cdn/{sha256}                           the bytes, with Range requests (206)

Errors carry the Hub's X-Error-Code (RepoNotFound, GatedRepo, RevisionNotFound, EntryNotFound),
which huggingface_hub turns into its own exceptions. Knobs let a test cut a transfer halfway,
serve bytes that do not match their sha256, or hold a transfer until it says so.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
from collections import Counter
from dataclasses import dataclass, field

from aiohttp import web


@dataclass
class FakeRepo:
    commit: str
    files: dict[str, bytes]
    gated: bool = False
    token: str | None = None  # a gated repo this token may read (sent as "Authorization: Bearer ...")


@dataclass
class FakeHub:
    repos: dict[str, FakeRepo] = field(default_factory=dict)
    downloads: Counter[str] = field(default_factory=Counter)  # GETs of file bytes, by sha256
    cut_next: set[str] = field(default_factory=set)  # sha256s whose next transfer breaks off halfway
    tamper: set[str] = field(default_factory=set)  # sha256s served with one byte changed
    hold: dict[str, threading.Event] = field(default_factory=dict)  # sha256 -> released when set
    transfers_started: Counter[str] = field(default_factory=Counter)
    throttle_bytes_per_s: dict[str, int] = field(default_factory=dict)  # sha256 -> a slow link's speed
    range_starts: dict[str, list[int]] = field(default_factory=dict)  # sha256 -> first byte of each transfer
    url: str = ""
    cdn_url: str = ""  # another origin, as the real Hub's CDN is: huggingface_hub follows it only for bytes

    def add_repo(
        self, repo_id: str, files: dict[str, bytes], gated: bool = False, token: str | None = None
    ) -> FakeRepo:
        commit = hashlib.sha1(repo_id.encode() + b"".join(sorted(files.values()))).hexdigest()
        repo = FakeRepo(commit, files, gated or token is not None, token)
        self.repos[repo_id] = repo
        return repo

    # -- serving ---------------------------------------------------------------------------------

    def _blobs(self) -> dict[str, bytes]:
        return {hashlib.sha256(data).hexdigest(): data for repo in self.repos.values() for data in repo.files.values()}

    def _repo(self, request: web.Request) -> FakeRepo:
        repo_id = request.match_info["repo"]
        repo = self.repos.get(repo_id)
        if repo is None:
            raise _hub_error(401, "RepoNotFound", f"Repository Not Found for url: {repo_id}")
        authorized = repo.token is not None and request.headers.get("Authorization") == f"Bearer {repo.token}"
        if repo.gated and not authorized:
            raise _hub_error(401, "GatedRepo", f"Access to model {repo_id} is restricted")
        return repo

    async def model_info(self, request: web.Request) -> web.Response:
        repo_id = request.match_info["repo"]
        repo = self._repo(request)
        revision = request.match_info.get("revision", "main")
        if revision not in ("main", repo.commit):
            raise _hub_error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        siblings = []
        for name, data in sorted(repo.files.items()):
            sha256 = hashlib.sha256(data).hexdigest()
            lfs = {"sha256": sha256, "size": len(data), "pointerSize": 134}
            siblings.append({"rfilename": name, "size": len(data), "blobId": sha256[:40], "lfs": lfs})
        return web.json_response({"id": repo_id, "modelId": repo_id, "sha": repo.commit, "siblings": siblings})

    async def resolve(self, request: web.Request) -> web.Response:
        repo = self._repo(request)
        revision, filename = request.match_info["revision"], request.match_info["filename"]
        if revision not in ("main", repo.commit):
            raise _hub_error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        data = repo.files.get(filename)
        if data is None:
            raise _hub_error(404, "EntryNotFound", f"{filename} does not exist")
        sha256 = hashlib.sha256(data).hexdigest()
        headers = {
            "X-Repo-Commit": repo.commit,
            "X-Linked-Etag": f'"{sha256}"',
            "X-Linked-Size": str(len(data)),
            "ETag": f'"{sha256[:40]}"',
            "Location": f"{self.cdn_url}/cdn/{sha256}",
        }
        return web.Response(status=302, headers=headers)

    async def cdn(self, request: web.Request) -> web.StreamResponse:
        sha256 = request.match_info["sha256"]
        data = self._blobs().get(sha256)
        if data is None:
            raise web.HTTPNotFound()
        if sha256 in self.tamper:
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        self.downloads[sha256] += 1
        self.transfers_started[sha256] += 1
        start = 0
        range_header = request.headers.get("Range", "")
        if range_header.startswith("bytes="):
            start = int(range_header.removeprefix("bytes=").split("-")[0])
        self.range_starts.setdefault(sha256, []).append(start)
        held = self.hold.get(sha256)
        if held is not None:
            await asyncio.to_thread(held.wait, 30)
        body = data[start:]
        response = web.StreamResponse(status=206 if start else 200)
        response.content_length = len(body)
        response.headers["Accept-Ranges"] = "bytes"
        if start:
            response.headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        await response.prepare(request)
        if sha256 in self.cut_next:
            self.cut_next.discard(sha256)
            await response.write(body[: len(body) // 2])
            assert request.transport is not None
            request.transport.close()  # the connection drops with half the promised bytes sent
            return response
        rate = self.throttle_bytes_per_s.get(sha256)
        if rate is None:
            await response.write(body)
        else:
            piece = max(1, rate // 20)
            for offset in range(0, len(body), piece):
                await response.write(body[offset : offset + piece])
                await asyncio.sleep(piece / rate)  # a slow link's pace, not a wait for an event
        await response.write_eof()
        return response

    def app(self) -> web.Application:
        app = web.Application()
        repo = "{repo:[^/]+/[^/]+}"
        app.router.add_get(f"/api/models/{repo}", self.model_info)
        app.router.add_get(f"/api/models/{repo}/revision/{{revision}}", self.model_info)
        app.router.add_route("*", f"/{repo}/resolve/{{revision}}/{{filename:.+}}", self.resolve)
        app.router.add_get("/cdn/{sha256}", self.cdn)
        return app

    # -- running in a thread of its own, so blocking clients (and other processes) can use it ------

    def start(self) -> str:
        started = threading.Event()
        self._loop = asyncio.new_event_loop()

        def run() -> None:
            asyncio.set_event_loop(self._loop)
            runner = web.AppRunner(self.app(), access_log=None)
            self._loop.run_until_complete(runner.setup())
            for _origin in ("hub", "cdn"):
                self._loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", 0).start())
            hub_port, cdn_port = (address[1] for address in runner.addresses)
            self.url, self.cdn_url = f"http://127.0.0.1:{hub_port}", f"http://127.0.0.1:{cdn_port}"
            self._runner = runner
            started.set()
            self._loop.run_forever()
            self._loop.run_until_complete(runner.cleanup())
            self._loop.close()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        started.wait(10)
        return self.url

    def stop(self) -> None:
        for event in self.hold.values():
            event.set()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


def _hub_error(status: int, code: str, message: str) -> web.HTTPException:
    error_class = {401: web.HTTPUnauthorized, 403: web.HTTPForbidden, 404: web.HTTPNotFound}[status]
    return error_class(headers={"X-Error-Code": code, "X-Error-Message": message}, text=message)


def main() -> None:
    """Serve GGUF files as a Hub repo, by hand:

    python -m tests.hub_server --repo owner/repo model-F16.gguf model-Q8_0.gguf
    HF_ENDPOINT=http://127.0.0.1:PORT emberd serve    # then: emberd pull hf.co/owner/repo:Q8_0
    """
    import argparse
    from pathlib import Path

    parser = argparse.ArgumentParser(description=main.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", required=True)
    parser.add_argument("files", nargs="+", type=Path)
    args = parser.parse_args()
    hub = FakeHub()
    hub.add_repo(args.repo, {path.name: path.read_bytes() for path in args.files})
    print(f"serving {args.repo} at {hub.start()}  (HF_ENDPOINT={hub.url}); Ctrl-C stops", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        hub.stop()


if __name__ == "__main__":
    main()
