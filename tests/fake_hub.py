"""A Hugging Face Hub on 127.0.0.1 for upload tests: the endpoints huggingface_hub calls to create a repo and a
branch, list a repo's files, validate a card's YAML, and commit files (preupload, the LFS batch API and its
single-part PUT, the ndjson commit), written from huggingface_hub's own client code (hf_api.py, _commit_api.py,
lfs.py). It keeps each repo's files per branch in memory, so a test reads back exactly what arrived.

Xet storage cannot be served here: clients must run with HF_HUB_DISABLE_XET=1 (the legacy LFS path)."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlparse

TOKEN = "hf_fake_token_for_tests"
USER = "tester"
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".ckpt")


class Repo:
    def __init__(self, private: bool):
        self.private = private
        self.branches: dict[str, dict[str, bytes]] = {"main": {}}
        self.commits: list[dict] = []  # {"branch", "summary", "added": [...], "deleted": [...]}


class FakeHub:
    """`with FakeHub() as hub:` serves on hub.url; hub.repos[repo_id].branches[name][path] = bytes."""

    def __init__(self):
        self.repos: dict[str, Repo] = {}
        self.lfs: dict[str, bytes] = {}  # sha256 -> bytes
        self.calls: list[tuple[str, str]] = []
        self.unknown: list[tuple[str, str]] = []  # requests no handler took: a test asserts there are none
        self.lock = threading.Lock()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                hub._handle(self, "GET")

            def do_POST(self):
                hub._handle(self, "POST")

            def do_PUT(self):
                hub._handle(self, "PUT")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    # -- plumbing -------------------------------------------------------------------------------------------------
    @staticmethod
    def _body(h) -> bytes:
        if h.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = b""
            while True:
                size = int(h.rfile.readline().strip().split(b";")[0], 16)
                if size == 0:
                    h.rfile.readline()
                    return out
                out += h.rfile.read(size)
                h.rfile.readline()
        n = int(h.headers.get("Content-Length") or 0)
        return h.rfile.read(n) if n else b""

    @staticmethod
    def _send(h, status: int, payload=None, headers: dict | None = None):
        data = b"" if payload is None else json.dumps(payload).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.end_headers()
        h.wfile.write(data)

    def _handle(self, h, method: str):
        url = urlparse(h.path)
        path, query = unquote(url.path), parse_qs(url.query)
        body = self._body(h)
        with self.lock:
            self.calls.append((method, path))
        if not path.startswith("/lfs-upload/") and h.headers.get("Authorization") != f"Bearer {TOKEN}":
            return self._send(h, 401, {"error": "Invalid credentials in Authorization header"})
        for pattern, verb, handler in self.ROUTES:
            m = re.fullmatch(pattern, path)
            if m and verb == method:
                with self.lock:
                    status, payload = handler(self, m, query, body)
                return self._send(h, status, payload, {"X-Error-Message": payload.get("error", "")}
                                  if status >= 400 and isinstance(payload, dict) else None)
        with self.lock:
            self.unknown.append((method, path))
        return self._send(h, 404, {"error": f"no such endpoint: {method} {path}"})

    def _repo(self, repo_id: str):
        return self.repos.get(repo_id)

    # -- endpoints ------------------------------------------------------------------------------------------------
    def whoami(self, m, q, body):
        return 200, {"type": "user", "name": USER, "orgs": [], "auth": {"type": "access_token"}}

    def create_repo(self, m, q, body):
        req = json.loads(body)
        repo_id = f"{req.get('organization') or USER}/{req['name']}"
        if req.get("type", "model") not in (None, "model"):
            return 400, {"error": "only model repos here"}
        if repo_id in self.repos:
            return 409, {"error": "You already created this model repo", "url": f"{self.url}/{repo_id}"}
        self.repos[repo_id] = Repo(private=req.get("visibility") == "private" or bool(req.get("private")))
        return 200, {"url": f"{self.url}/{repo_id}", "name": repo_id}

    def create_branch(self, m, q, body):
        repo = self._repo(m["repo"])
        if repo is None:
            return 404, {"error": "Repository not found"}
        if m["branch"] in repo.branches:
            return 409, {"error": "Reference already exists"}
        start = (json.loads(body) if body else {}).get("startingPoint") or "main"
        repo.branches[m["branch"]] = dict(repo.branches[start])
        return 200, {}

    def tree(self, m, q, body):
        repo = self._repo(m["repo"])
        if repo is None or m["rev"] not in repo.branches:
            return 404, {"error": "Repository or revision not found"}
        files = repo.branches[m["rev"]]
        return 200, [{"type": "file", "path": p, "size": len(b), "oid": hashlib.sha1(b).hexdigest()}
                     for p, b in sorted(files.items())]

    def validate_yaml(self, m, q, body):
        content = json.loads(body)["content"]
        if not content.startswith("---\n"):
            return 400, {"errors": [{"message": "no metadata block"}], "error": "no metadata block"}
        return 200, {"warnings": []}

    def preupload(self, m, q, body):
        repo = self._repo(m["repo"])
        if repo is None:
            return 404, {"error": "Repository not found"}
        files = json.loads(body)["files"]
        return 200, {"files": [{"path": f["path"], "shouldIgnore": False, "oid": None,
                                "uploadMode": "lfs" if f["path"].endswith(LFS_SUFFIXES) else "regular"}
                               for f in files]}

    def lfs_batch(self, m, q, body):
        req = json.loads(body)
        assert req["operation"] == "upload" and req["hash_algo"] == "sha256"
        objects = []
        for obj in req["objects"]:
            entry = {"oid": obj["oid"], "size": obj["size"]}
            if obj["oid"] not in self.lfs:
                entry["actions"] = {"upload": {"href": f"{self.url}/lfs-upload/{obj['oid']}"}}
            objects.append(entry)
        return 200, {"transfer": "basic", "objects": objects}

    def lfs_upload(self, m, q, body):
        if hashlib.sha256(body).hexdigest() != m["oid"]:
            return 400, {"error": "sha256 mismatch"}
        self.lfs[m["oid"]] = body
        return 200, {}

    def commit(self, m, q, body):
        repo = self._repo(m["repo"])
        if repo is None or m["rev"] not in repo.branches:
            return 404, {"error": "Repository or revision not found"}
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        header = lines[0]
        assert header["key"] == "header", header
        files = dict(repo.branches[m["rev"]])
        added, deleted = [], []
        for item in lines[1:]:
            v = item["value"]
            if item["key"] == "file":
                assert v["encoding"] == "base64"
                files[v["path"]] = base64.b64decode(v["content"])
                added.append(v["path"])
            elif item["key"] == "lfsFile":
                if v["oid"] not in self.lfs:
                    return 422, {"error": f"LFS object {v['oid']} was never uploaded"}
                files[v["path"]] = self.lfs[v["oid"]]
                added.append(v["path"])
            elif item["key"] == "deletedFile":
                if v["path"] not in files:
                    return 404, {"error": "A file with this name doesn't exist"}
                del files[v["path"]]
                deleted.append(v["path"])
            elif item["key"] == "deletedFolder":
                for p in [p for p in files if p.startswith(v["path"].rstrip("/") + "/")]:
                    del files[p]
                    deleted.append(p)
            else:
                return 400, {"error": f"unknown commit key {item['key']}"}
        repo.branches[m["rev"]] = files
        oid = hashlib.sha1(json.dumps([header, added, deleted, len(repo.commits)]).encode()).hexdigest()
        repo.commits.append({"branch": m["rev"], "summary": header["value"]["summary"], "added": added,
                             "deleted": deleted})
        return 200, {"commitUrl": f"{self.url}/{m['repo']}/commit/{oid}", "commitOid": oid,
                     "pullRequestUrl": None}

    REPO = r"(?P<repo>[^/]+/[^/]+)"
    ROUTES = [
        (r"/api/whoami-v2", "GET", whoami),
        (r"/api/repos/create", "POST", create_repo),
        (rf"/api/models/{REPO}/branch/(?P<branch>[^/]+)", "POST", create_branch),
        (rf"/api/models/{REPO}/tree/(?P<rev>[^/]+)", "GET", tree),
        (r"/api/validate-yaml", "POST", validate_yaml),
        (rf"/api/models/{REPO}/preupload/(?P<rev>[^/]+)", "POST", preupload),
        (rf"/{REPO}\.git/info/lfs/objects/batch", "POST", lfs_batch),
        (r"/lfs-upload/(?P<oid>[0-9a-f]{64})", "PUT", lfs_upload),
        (rf"/api/models/{REPO}/commit/(?P<rev>[^/]+)", "POST", commit),
    ]
