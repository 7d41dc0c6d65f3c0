"""Offline tests for scripts/download_hf_assets.py.

The script is not part of the package, so it is imported from its path. Hub failures are
simulated with the exception objects huggingface_hub itself builds (via hf_raise_for_status on a
fake response), and the end-to-end cases talk to a tiny local HTTP server standing in for the Hub.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Self
from urllib.parse import unquote, urlparse

import httpx
import pytest
from huggingface_hub import constants
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.hf_api import HfApi, ModelInfo
from huggingface_hub.utils import disable_progress_bars, enable_progress_bars, hf_raise_for_status

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "download_hf_assets.py"
REPO_ID = "nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-BF16"
SECRET = "hf_SeCrEtToKeN0123456789abcdefXYZ"
SHA = "0123456789abcdef0123456789abcdef01234567"


def _load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("download_hf_assets", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


dl = _load_script()

SHARDS = [f"model-{i:05d}-of-00013.safetensors" for i in range(1, 14)]
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"]
CONFIG_FILES = ["config.json", "generation_config.json"]
INDEX_FILES = ["model.safetensors.index.json"]
OTHER_FILES = [
    ".gitattributes",
    "README.md",
    "LICENSE",
    "configuration_nemotron_h.py",
    "modeling_nemotron_h.py",
    "accuracy_chart.png",
]
FAKE_REPO = SHARDS + INDEX_FILES + CONFIG_FILES + TOKENIZER_FILES + OTHER_FILES


# --------------------------------------------------------------------------- file selection


@pytest.mark.parametrize(
    ("assets", "expected"),
    [
        (["tokenizer"], TOKENIZER_FILES),
        (["config"], CONFIG_FILES),
        (["index"], INDEX_FILES),
        (["safetensors"], SHARDS),
        (["tokenizer", "config", "index"], TOKENIZER_FILES + CONFIG_FILES + INDEX_FILES),
        (["safetensors", "index", "safetensors"], SHARDS + INDEX_FILES),
    ],
)
def test_select_files_per_asset(assets: list[str], expected: list[str]) -> None:
    assert dl.select_files(FAKE_REPO, assets, all_=False) == sorted(expected)


def test_select_files_all_includes_everything() -> None:
    selected = dl.select_files(FAKE_REPO, [], all_=True)
    assert selected == sorted(FAKE_REPO)
    assert {"README.md", "LICENSE", *SHARDS} <= set(selected)


def test_select_files_safetensors_does_not_grab_index() -> None:
    assert "model.safetensors.index.json" not in dl.select_files(FAKE_REPO, ["safetensors"], all_=False)


def test_select_files_other_tokenizer_layouts() -> None:
    repo = ["config.json", "tokenizer.model", "qwen.tiktoken", "vocab.json", "merges.txt", "README.md"]
    assert dl.select_files(repo, ["tokenizer"], all_=False) == sorted(
        ["tokenizer.model", "qwen.tiktoken", "vocab.json", "merges.txt"]
    )


def test_select_files_group_without_match_raises() -> None:
    repo_without_tokenizer = [f for f in FAKE_REPO if f not in TOKENIZER_FILES]
    with pytest.raises(dl.NoMatchingFilesError) as info:
        dl.select_files(repo_without_tokenizer, ["config", "tokenizer"], all_=False)
    assert info.value.asset == "tokenizer"
    with pytest.raises(dl.NoMatchingFilesError):
        dl.select_files([], [], all_=True)


def test_select_patterns() -> None:
    assert dl.select_patterns(["tokenizer"], all_=True) is None
    assert dl.select_patterns(["index"], all_=False) == ["model.safetensors.index.json"]
    assert dl.select_patterns(["safetensors", "safetensors"], all_=False) == ["*.safetensors"]
    tokenizer = dl.select_patterns(["tokenizer"], all_=False)
    assert {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model"} <= set(tokenizer)
    assert {"*.tiktoken", "chat_template.jinja"} <= set(tokenizer)
    with pytest.raises(ValueError):
        dl.select_patterns(["weights"], all_=False)


def test_format_size_and_disk_warning(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert dl._format_size(999) == "999 B"
    assert dl._format_size(63_200_000_000) == "63.2 GB"
    monkeypatch.setattr(dl.shutil, "disk_usage", lambda path: SimpleNamespace(free=10_000_000_000))
    dl._warn_if_low_disk(tmp_path / "not" / "yet" / "created", 63_200_000_000)
    assert "warning: 63.2 GB to fetch but only 10.0 GB free" in capsys.readouterr().err
    dl._warn_if_low_disk(tmp_path, 1_000)
    assert capsys.readouterr().err == ""


def test_help_documents_every_choice(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        dl.main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for name in [*dl.ASSET_PATTERNS, "--all", "--revision", "--hf_token", "HF_TOKEN"]:
        assert name in out


def test_assets_and_all_are_exclusive_and_required(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in ([], ["--all", "--assets", "config"], ["--assets", "weights"]):
        with pytest.raises(SystemExit) as info:
            dl.main(argv)
        assert info.value.code == 2
    capsys.readouterr()


# --------------------------------------------------------------------------- error paths (mocked Hub)


def _hub_error(status: int, error_code: str | None = None, error_message: str | None = None) -> HfHubHTTPError:
    """Build the exception huggingface_hub raises for such a Hub response."""
    url = f"https://huggingface.co/api/models/{REPO_ID}/revision/main"
    headers = {"X-Error-Code": error_code} if error_code else {}
    if error_message:
        headers["X-Error-Message"] = error_message
    response = httpx.Response(status, headers=headers, request=httpx.Request("GET", url))
    with pytest.raises(HfHubHTTPError) as info:
        hf_raise_for_status(response)
    return info.value


def _fake_info(files: list[str] = FAKE_REPO) -> ModelInfo:
    return ModelInfo(id=REPO_ID, sha=SHA, siblings=[{"rfilename": f, "size": 1000} for f in files])


def _connect_error() -> httpx.ConnectError:
    request = httpx.Request("GET", f"https://huggingface.co/api/models/{REPO_ID}")
    return httpx.ConnectError(f"[Errno -3] Temporary failure in name resolution ({SECRET})", request=request)


def _offline_local_entry_error() -> LocalEntryNotFoundError:
    """snapshot_download's wrapping of a connection failure, with the cause chained like it does."""
    try:
        try:
            raise _connect_error()
        except httpx.ConnectError as cause:
            raise LocalEntryNotFoundError("An error happened while trying to locate the files on the Hub") from cause
    except LocalEntryNotFoundError as err:
        return err


@pytest.fixture
def token_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_TOKEN", SECRET)
    monkeypatch.chdir(tmp_path)


def _run_main(capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[int, str, str]:
    code = dl.main(["--repo_id", REPO_ID, "--assets", "tokenizer", "config", *extra])
    out, err = capsys.readouterr()
    return code, out, err


def _assert_clean_error(out: str, err: str, expected: str) -> None:
    assert SECRET not in out + err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert expected in lines[0]


@pytest.mark.parametrize(
    ("make_error", "where", "code", "expected"),
    [
        (lambda: _hub_error(403, "GatedRepo"), "snapshot", dl.EXIT_ACCESS, "gated repo"),
        (lambda: _hub_error(401, "GatedRepo"), "repo_info", dl.EXIT_ACCESS, "gated repo"),
        (lambda: _hub_error(404, "RepoNotFound"), "repo_info", dl.EXIT_NOT_FOUND, "not found"),
        (lambda: _hub_error(401), "repo_info", dl.EXIT_NOT_FOUND, "not found"),
        (lambda: _hub_error(404, "RevisionNotFound"), "repo_info", dl.EXIT_NOT_FOUND, "revision 'main' not found"),
        (lambda: _hub_error(503), "repo_info", dl.EXIT_NETWORK, "HTTP 503"),
        (
            lambda: _hub_error(401, error_message="Invalid credentials in Authorization header"),
            "repo_info",
            dl.EXIT_ACCESS,
            "rejected the token",
        ),
        (lambda: _hub_error(404, "RepoNotFound"), "snapshot", dl.EXIT_NOT_FOUND, "not found"),
        (_connect_error, "repo_info", dl.EXIT_NETWORK, "cannot reach the Hugging Face Hub"),
        (lambda: httpx.ConnectTimeout("timed out"), "repo_info", dl.EXIT_NETWORK, "ConnectTimeout"),
        (lambda: OfflineModeIsEnabled("offline"), "repo_info", dl.EXIT_NETWORK, "HF_HUB_OFFLINE=1"),
        (_offline_local_entry_error, "snapshot", dl.EXIT_NETWORK, "cannot reach the Hugging Face Hub"),
        (lambda: OSError(28, "No space left on device", "model-00001.safetensors"), "snapshot", 1, "No space left"),
    ],
)
def test_hub_errors_give_one_line_message(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    token_env: None,
    make_error,
    where: str,
    code: int,
    expected: str,
) -> None:
    error = make_error()

    def failing(*args, **kwargs):
        raise error

    if where == "repo_info":
        monkeypatch.setattr(HfApi, "repo_info", failing)
    else:
        monkeypatch.setattr(HfApi, "repo_info", lambda *a, **k: _fake_info())
        monkeypatch.setattr(dl, "snapshot_download", failing)
    got, out, err = _run_main(capsys, "--hf_token", SECRET)
    assert got == code
    _assert_clean_error(out, err, expected)


def test_real_exception_classes_are_what_the_script_expects() -> None:
    assert isinstance(_hub_error(403, "GatedRepo"), GatedRepoError)
    assert isinstance(_hub_error(404, "RepoNotFound"), RepositoryNotFoundError)
    assert isinstance(_hub_error(404, "RevisionNotFound"), RevisionNotFoundError)


def test_no_matching_asset_exits_with_message(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], token_env: None
) -> None:
    monkeypatch.setattr(HfApi, "repo_info", lambda *a, **k: _fake_info(SHARDS + CONFIG_FILES))
    monkeypatch.setattr(dl, "snapshot_download", lambda *a, **k: pytest.fail("must not download"))
    got, out, err = _run_main(capsys)
    assert got == dl.EXIT_NO_MATCH
    _assert_clean_error(out, err, "--assets tokenizer matches no file")


def test_unexpected_error_is_redacted(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], token_env: None
) -> None:
    def boom(*args, **kwargs):
        raise RuntimeError(f"Authorization: Bearer {SECRET}")

    monkeypatch.setattr(HfApi, "repo_info", boom)
    got, out, err = _run_main(capsys)
    assert got == dl.EXIT_ERROR
    assert SECRET not in out + err
    assert "RuntimeError" in err


def test_success_pins_commit_and_passes_patterns(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], token_env: None
) -> None:
    calls: list[dict] = []
    monkeypatch.setattr(HfApi, "repo_info", lambda *a, **k: _fake_info())

    def fake_snapshot(repo_id: str, **kwargs) -> str:
        calls.append({"repo_id": repo_id, **kwargs})
        return str(kwargs["local_dir"])

    monkeypatch.setattr(dl, "snapshot_download", fake_snapshot)
    got, out, err = _run_main(capsys, "--local_dir", "out")
    assert got == 0, err
    assert SECRET not in out + err
    (call,) = calls
    assert call["repo_id"] == REPO_ID and call["revision"] == SHA and call["local_dir"] == Path("out")
    assert call["allow_patterns"] == dl.select_patterns(["tokenizer", "config"], all_=False)
    assert call["token"] is None  # resolved from HF_TOKEN by huggingface_hub itself
    assert "6 files" in out


def test_dry_run_lists_files(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], token_env: None
) -> None:
    monkeypatch.setattr(HfApi, "repo_info", lambda *a, **k: _fake_info())
    monkeypatch.setattr(dl, "snapshot_download", lambda *a, **k: pytest.fail("must not download"))
    assert dl.main(["--repo_id", REPO_ID, "--all", "--dry_run"]) == 0
    out = capsys.readouterr().out
    assert f"{len(FAKE_REPO)} files" in out and all(name in out for name in FAKE_REPO)


# --------------------------------------------------------------------------- real runs (subprocess)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run_script(tmp_path: Path, *argv: str, **env: str) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    full_env.update(HF_HOME=str(tmp_path / "hf_home"), HF_TOKEN=SECRET, HF_HUB_DISABLE_PROGRESS_BARS="1", **env)
    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--repo_id", REPO_ID, "--local_dir", str(tmp_path / "out"), *argv],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert time.monotonic() - start < 30, "must fail fast, not hang"
    return result


def test_real_offline_mode_fails_fast(tmp_path: Path) -> None:
    result = _run_script(tmp_path, "--assets", "tokenizer", HF_HUB_OFFLINE="1")
    assert result.returncode == dl.EXIT_NETWORK
    _assert_clean_error(result.stdout, result.stderr, "HF_HUB_OFFLINE=1")
    assert not (tmp_path / "out").exists()


def test_real_unreachable_hub_fails_fast(tmp_path: Path) -> None:
    result = _run_script(tmp_path, "--all", HF_ENDPOINT=f"http://127.0.0.1:{_free_port()}")
    assert result.returncode == dl.EXIT_NETWORK
    _assert_clean_error(result.stdout, result.stderr, "cannot reach the Hugging Face Hub")


# --------------------------------------------------------------------------- local fake Hub


def _etag(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


class _FakeHub:
    """Minimal stand-in for the Hub endpoints snapshot_download uses (no Xet, plain HTTP)."""

    def __init__(self, files: dict[str, bytes], gated: bool = False, failing: set[str] | None = None) -> None:
        self.files = files
        self.gated = gated
        self.failing = set(failing or ())  # files whose body download answers HTTP 500
        self.downloads: list[str] = []  # file names served with a body
        self.auth_headers: list[str] = []  # Authorization header of each request for the repo
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep pytest output clean
                pass

            def do_GET(self) -> None:
                hub.handle(self, body=True)

            def do_HEAD(self) -> None:
                hub.handle(self, body=False)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def _send(self, req: BaseHTTPRequestHandler, status: int, data: bytes, headers: dict[str, str], body: bool) -> None:
        req.send_response(status)
        for key, value in {"Content-Length": str(len(data)), **headers}.items():
            req.send_header(key, value)
        req.end_headers()
        if body:
            req.wfile.write(data)

    def handle(self, req: BaseHTTPRequestHandler, body: bool) -> None:
        path = unquote(urlparse(req.path).path)
        if REPO_ID in path:  # huggingface_hub also makes unauthenticated calls of its own
            self.auth_headers.append(req.headers.get("authorization", ""))
        api_prefix = f"/api/models/{REPO_ID}/"
        resolve_prefix = f"/{REPO_ID}/resolve/"
        if path.startswith(api_prefix + "revision/"):
            siblings = [{"rfilename": name, "size": len(data)} for name, data in self.files.items()]
            payload = json.dumps({"id": REPO_ID, "sha": SHA, "siblings": siblings}).encode()
            self._send(req, 200, payload, {"Content-Type": "application/json"}, body)
        elif path.startswith(api_prefix + "tree/"):
            entries = [
                {"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                for name, data in self.files.items()
            ]
            self._send(req, 200, json.dumps(entries).encode(), {"Content-Type": "application/json"}, body)
        elif path.startswith(resolve_prefix):
            name = path[len(resolve_prefix) :].split("/", 1)[1]
            if self.gated:
                self._send(req, 403, b"gated", {"X-Error-Code": "GatedRepo"}, body)
                return
            if body and name in self.failing:
                self._send(req, 500, b"boom", {}, body)
                return
            data = self.files[name]
            start = 0
            if body and (rng := req.headers.get("Range")):
                start = int(rng.split("=")[1].split("-")[0])
            headers = {"ETag": f'"{_etag(data)}"', "X-Repo-Commit": SHA}
            if body:
                self.downloads.append(name)
            self._send(req, 206 if start else 200, data[start:], headers, body)
        else:
            self._send(req, 404, b"", {"X-Error-Code": "RepoNotFound"}, body)

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def no_progress_bars() -> Iterator[None]:
    """Progress bars would share stderr with the error line under test."""
    disable_progress_bars()
    yield
    enable_progress_bars()


def _patch_endpoint(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    """Point huggingface_hub (which reads HF_ENDPOINT at import time) at the local fake Hub."""
    monkeypatch.setattr(constants, "ENDPOINT", url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")


def test_fake_hub_downloads_only_selected_and_skips_on_rerun(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], token_env: None, tmp_path: Path
) -> None:
    files = {name: f"content of {name}".encode() * 10 for name in FAKE_REPO}
    out_dir = tmp_path / "out"
    argv = ["--repo_id", REPO_ID, "--local_dir", str(out_dir), "--assets", "tokenizer", "config", "index"]
    with _FakeHub(files) as hub:
        _patch_endpoint(monkeypatch, hub.url)
        assert dl.main(argv) == 0
        expected = sorted(TOKENIZER_FILES + CONFIG_FILES + INDEX_FILES)
        assert sorted(hub.downloads) == expected
        downloaded = sorted(p.name for p in out_dir.iterdir() if p.is_file())
        assert downloaded == expected
        assert all((out_dir / name).read_bytes() == files[name] for name in expected)
        # The token from HF_TOKEN reaches the Hub on every repo request.
        assert hub.auth_headers and all(h == f"Bearer {SECRET}" for h in hub.auth_headers)

        hub.downloads.clear()
        assert dl.main(argv) == 0  # re-run: everything already complete at this commit
        assert hub.downloads == []
    out, err = capsys.readouterr()
    assert SECRET not in out + err


def test_fake_hub_gated_file_download(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    token_env: None,
    no_progress_bars: None,
    tmp_path: Path,
) -> None:
    """Gated repos list publicly; the refusal comes on the file download, inside snapshot_download."""
    files = {name: b"x" for name in FAKE_REPO}
    with _FakeHub(files, gated=True) as hub:
        _patch_endpoint(monkeypatch, hub.url)
        code = dl.main(["--repo_id", REPO_ID, "--local_dir", str(tmp_path / "out"), "--assets", "config"])
    out, err = capsys.readouterr()
    assert code == dl.EXIT_ACCESS
    _assert_clean_error(out, err, "gated repo")


def test_fake_hub_interrupted_run_resumes_missing_files_only(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    token_env: None,
    no_progress_bars: None,
    tmp_path: Path,
) -> None:
    """A run that dies on one shard keeps the finished files; the re-run fetches only the rest."""
    files = {name: name.encode() * 100 for name in FAKE_REPO}
    broken = SHARDS[6]
    argv = ["--repo_id", REPO_ID, "--local_dir", str(tmp_path / "out"), "--assets", "safetensors", "index"]
    argv += ["--max_workers", "1"]  # sequential, in listing order: shards 1-6 finish before 7 fails
    with _FakeHub(files, failing={broken}) as hub:
        _patch_endpoint(monkeypatch, hub.url)
        assert dl.main(argv) == dl.EXIT_NETWORK
        _assert_clean_error(*capsys.readouterr(), "re-run later to resume")
        assert not (tmp_path / "out" / broken).exists()
        finished = set(hub.downloads)
        assert set(SHARDS[:6]) <= finished and broken not in finished
        assert all((tmp_path / "out" / name).exists() for name in finished)

        hub.failing.clear()
        hub.downloads.clear()
        assert dl.main(argv) == 0
    assert broken in hub.downloads
    assert sorted(hub.downloads) == sorted(set(SHARDS + INDEX_FILES) - finished)
    assert all((tmp_path / "out" / name).read_bytes() == files[name] for name in SHARDS + INDEX_FILES)
