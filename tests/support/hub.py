"""A Hugging Face hub in memory, behind huggingface_hub's own HTTP client.

``huggingface_hub.utils.set_client_factory`` is the client's public boundary: every request the
hub library makes (transformers' downloads included) goes through the client it returns. Here
that client's transport serves repositories from local directories, answering the endpoints the
library uses (file metadata and downloads under ``/resolve/``, the model / dataset info and tree
APIs), and records every request. No network is used.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import httpx2
from huggingface_hub.utils import set_client_factory
from huggingface_hub.utils._http import default_client_factory, hf_request_event_hook

COMMIT = "0123456789abcdef0123456789abcdef01234567"
RESOLVE = re.compile(r"^/(?:datasets/)?(?P<repo>[^/]+/[^/]+)/resolve/(?P<revision>[^/]+)/(?P<file>.+)$")
API = re.compile(r"^/api/(?:models|datasets)/(?P<repo>[^/]+/[^/]+)(?:/revision/(?P<revision>[^/]+)|/tree/(?P<tree>[^/]+)(?P<sub>/.*)?)?$")


class FakeHub:
    def __init__(self, repos: dict[str, Path], reachable: bool = True):
        self.repos = {repo: Path(root) for repo, root in repos.items()}
        self.reachable = reachable
        self.requests: list[tuple[str, str]] = []  # (method, path)

    def install(self) -> None:
        hook = {"request": [hf_request_event_hook]}  # the library's own hook: it enforces HF_HUB_OFFLINE
        set_client_factory(lambda: httpx2.Client(transport=httpx2.MockTransport(self._answer), event_hooks=hook,
                                                 follow_redirects=True))

    @staticmethod
    def uninstall() -> None:
        set_client_factory(default_client_factory)

    def downloads(self) -> list[str]:
        """The files fetched (GET under /resolve/), as ``revision/file``."""
        return [f"{m['revision']}/{m['file']}" for method, path in self.requests
                if method == "GET" and (m := RESOLVE.match(path))]

    def _answer(self, request: httpx2.Request) -> httpx2.Response:
        if not self.reachable:
            raise httpx2.ConnectError("[Errno -2] Name or service not known", request=request)
        path = request.url.path
        self.requests.append((request.method, path))
        if match := RESOLVE.match(path):
            root = self.repos.get(match["repo"])
            if root is None:
                return httpx2.Response(404, headers={"X-Error-Code": "RepoNotFound"})
            file = root / match["file"]
            if not file.is_file():
                return httpx2.Response(404, headers={"X-Error-Code": "EntryNotFound", "X-Repo-Commit": COMMIT})
            data = file.read_bytes()
            headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                       "Content-Length": str(len(data))}
            return httpx2.Response(200, headers=headers, content=b"" if request.method == "HEAD" else data)
        if match := API.match(path):
            root = self.repos.get(match["repo"])
            if root is None:
                return httpx2.Response(404, headers={"X-Error-Code": "RepoNotFound"})
            files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
            if match["tree"] is not None:
                sub = (match["sub"] or "").strip("/")
                return httpx2.Response(200, json=[{"type": "file", "path": f, "size": (root / f).stat().st_size, "oid": COMMIT}
                                                  for f in files if f.startswith(sub)])
            return httpx2.Response(200, json={"id": match["repo"], "sha": COMMIT, "siblings": [{"rfilename": f} for f in files]})
        return httpx2.Response(200 if path in ("", "/") else 404)
