"""A Hugging Face Hub on localhost, enough for ``huggingface_hub.snapshot_download``: repo info,
the file tree, and file downloads (HEAD and GET), for repositories given as
``{repo_id: {file name: bytes}}`` with one revision each (``main``)."""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse


def commit_of(files: dict[str, bytes]) -> str:
    return hashlib.sha1(
        json.dumps(sorted((n, hashlib.sha1(b).hexdigest()) for n, b in files.items())).encode()
    ).hexdigest()


class FakeHub:
    def __init__(self, repos: dict[str, dict[str, bytes]]):
        self.repos, self.requests = repos, []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def reply(self, code: int, body: bytes = b"", headers: tuple = ()) -> None:
                self.send_response(code)
                for key, value in headers:
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def do_GET(self) -> None:
                hub.requests.append((self.command, self.path))
                self.reply(*hub.answer(unquote(urlparse(self.path).path).strip("/").split("/")))

            do_HEAD = do_GET

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"

    def answer(self, parts: list[str]) -> tuple:
        missing = (404, b'{"error": "Repository not found"}', [("X-Error-Code", "RepoNotFound")])
        if parts[:2] == ["api", "models"]:  # /api/models/{org}/{name}/(revision|tree)/{rev}
            files = self.repos.get("/".join(parts[2:4]))
            if files is None:
                return missing
            if parts[4:5] == ["revision"]:
                info = {
                    "id": "/".join(parts[2:4]),
                    "sha": commit_of(files),
                    "siblings": [{"rfilename": n} for n in files],
                }
            else:
                info = [
                    {"type": "file", "path": n, "size": len(b), "oid": hashlib.sha1(b).hexdigest()}
                    for n, b in files.items()
                ]
            return 200, json.dumps(info).encode(), [("Content-Type", "application/json")]
        files = self.repos.get("/".join(parts[:2]))  # /{org}/{name}/resolve/{rev}/{file}
        if files is None or parts[2:3] != ["resolve"]:
            return missing
        body = files.get("/".join(parts[4:]))
        if body is None:
            return 404, b"", [("X-Error-Code", "EntryNotFound")]
        return 200, body, [("X-Repo-Commit", commit_of(files)), ("ETag", f'"{hashlib.sha1(body).hexdigest()}"')]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
