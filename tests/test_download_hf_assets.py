"""Offline tests for scripts/download_hf_assets.py.

The Hub is replaced by fakes: ``HfApi.repo_info`` returns a fixed listing and ``snapshot_download``
writes the files its allow_patterns select, or either raises the exception huggingface_hub itself
builds for a given Hub response. A few runs go through a subprocess against no network at all.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from huggingface_hub import HfApi
from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled
from huggingface_hub.hf_api import ModelInfo
from huggingface_hub.utils import filter_repo_objects, hf_raise_for_status

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "download_hf_assets.py"
_spec = importlib.util.spec_from_file_location("download_hf_assets", SCRIPT)
dl = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(dl)

REPO_ID = "nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-BF16"
NAME = REPO_ID.split("/")[1]
SECRET = "hf_SeCrEtToKeN0123456789abcdefXYZ"
SHA = "0123456789abcdef0123456789abcdef01234567"
TOKENIZER = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
]
CONFIG = ["config.json", "generation_config.json"]
INDEX = ["model.safetensors.index.json"]
SHARDS = [f"model-{i:05d}-of-00003.safetensors" for i in range(1, 4)]
OTHER = [".gitattributes", "README.md", "modeling_nemotron_h.py"]
REPO = TOKENIZER + CONFIG + INDEX + SHARDS + OTHER


def hub_error(status: int, error_code: str | None = None) -> Exception:
    """The exception huggingface_hub raises for this Hub response."""
    request = httpx.Request("GET", f"https://huggingface.co/api/models/{REPO_ID}")
    headers = {"X-Error-Code": error_code} if error_code else {}
    try:
        hf_raise_for_status(httpx.Response(status, headers=headers, request=request))
    except Exception as exc:  # noqa: BLE001
        return exc
    raise AssertionError("no error raised")


def local_entry_error() -> LocalEntryNotFoundError:
    """How snapshot_download reports an unreachable Hub: the connection error as its cause."""
    try:
        try:
            raise httpx.ConnectError(f"name resolution failed ({SECRET})")
        except httpx.ConnectError as cause:
            raise LocalEntryNotFoundError("cannot locate the files") from cause
    except LocalEntryNotFoundError as exc:
        return exc


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict:
    """A fake Hub; set hub["files"], hub["fail_listing"] or hub["fail_download"] to change it."""
    monkeypatch.setenv("HF_TOKEN", SECRET)
    monkeypatch.chdir(tmp_path)
    state: dict = {"files": REPO, "fail_listing": None, "fail_download": None, "calls": []}

    def repo_info(self, repo_id, **kwargs):
        if state["fail_listing"]:
            raise state["fail_listing"]
        return ModelInfo(id=repo_id, sha=SHA, siblings=[{"rfilename": f} for f in state["files"]])

    def snapshot_download(repo_id, *, local_dir, allow_patterns, **kwargs):
        state["calls"].append({"allow_patterns": allow_patterns, **kwargs})
        if state["fail_download"]:
            raise state["fail_download"]
        for name in filter_repo_objects(state["files"], allow_patterns=allow_patterns):
            (Path(local_dir) / name).parent.mkdir(parents=True, exist_ok=True)
            (Path(local_dir) / name).write_text(name)
        return str(local_dir)

    monkeypatch.setattr(HfApi, "repo_info", repo_info)
    monkeypatch.setattr(dl, "snapshot_download", snapshot_download)
    return state


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = dl.main(["--local_dir", "out", *argv])
    out, err = capsys.readouterr()
    assert SECRET not in out + err
    return code, out, err


def assert_one_line_error(err: str) -> None:
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), err


@pytest.mark.parametrize(
    ("assets", "expected"),
    [
        (["tokenizer"], TOKENIZER),
        (["config"], CONFIG),
        (["index"], INDEX),
        (["safetensors"], SHARDS),
        (["tokenizer", "config", "index"], TOKENIZER + CONFIG + INDEX),
        (["--all"], REPO),
        (["--additional_patterns", "*.py", "README.md"], ["modeling_nemotron_h.py", "README.md"]),
    ],
)
def test_downloads_selected_files_to_local_dir_name(hub, capsys, tmp_path, assets, expected):
    argv = assets if assets[0].startswith("--") else ["--assets", *assets]
    code, out, err = run(capsys, *argv)
    assert code == 0, err
    dest = tmp_path / "out" / NAME
    assert sorted(p.name for p in dest.iterdir()) == sorted(expected)
    (call,) = hub["calls"]
    assert call["revision"] == SHA and call["token"] is None  # HF_TOKEN is read by huggingface_hub
    assert (call["allow_patterns"] is None) == (assets == ["--all"])
    assert out.strip().splitlines()[-1].endswith(str(Path("out") / NAME))


@pytest.mark.parametrize(
    ("asset", "names"),
    [
        ("tokenizer", TOKENIZER + ["tokenizer.model", "vocab.json", "merges.txt"]),
        ("config", CONFIG),
    ],
)
def test_asset_patterns_cover_other_layouts(hub, capsys, asset, names):
    """Patterns are what snapshot_download filters with; the fake repo has only one layout."""
    hub["files"] = names + SHARDS + INDEX + OTHER
    assert run(capsys, "--assets", asset)[0] == 0
    selected = filter_repo_objects(hub["files"], allow_patterns=hub["calls"][0]["allow_patterns"])
    assert sorted(selected) == sorted(names)


def test_hf_token_flag_is_passed_on_not_printed(hub, capsys):
    assert run(capsys, "--assets", "config", "--hf_token", SECRET)[0] == 0
    assert hub["calls"][0]["token"] == SECRET


def test_group_without_match_fails_before_downloading(hub, capsys, tmp_path):
    hub["files"] = CONFIG + SHARDS
    code, _, err = run(capsys, "--assets", "config", "tokenizer")
    assert code == dl.EXIT_NO_MATCH
    assert_one_line_error(err)
    assert err.startswith(f"error: tokenizer matched no file in {REPO_ID}@main")
    assert hub["calls"] == [] and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("stage", "make_error", "code", "text"),
    [
        ("download", lambda: hub_error(403, "GatedRepo"), dl.EXIT_AUTH, "not authorized"),
        ("download", lambda: hub_error(403), dl.EXIT_AUTH, "not authorized"),
        ("listing", lambda: hub_error(401, "RepoNotFound"), dl.EXIT_NOT_FOUND, "not found"),
        ("listing", lambda: hub_error(404, "RevisionNotFound"), dl.EXIT_NOT_FOUND, "@v9 not found"),
        ("listing", lambda: httpx.ConnectError(SECRET), dl.EXIT_OFFLINE, "cannot reach the Hub"),
        ("listing", lambda: OfflineModeIsEnabled("no"), dl.EXIT_OFFLINE, "HF_HUB_OFFLINE=1"),
        ("listing", lambda: hub_error(503), dl.EXIT_OFFLINE, "cannot reach the Hub"),
        ("download", local_entry_error, dl.EXIT_OFFLINE, "cannot reach the Hub"),
        (
            "download",
            lambda: OSError(28, "No space left on device", "x"),
            dl.EXIT_OTHER,
            "No space",
        ),
        (
            "download",
            lambda: RuntimeError(f"a\nb {SECRET}"),
            dl.EXIT_OTHER,
            "RuntimeError: a b ***",
        ),
    ],
)
def test_failures_give_one_line_and_exit_code(hub, capsys, stage, make_error, code, text):
    hub[f"fail_{stage}"] = make_error()
    got, _, err = run(capsys, "--assets", "config", "--revision", "v9", "--hf_token", SECRET)
    assert got == code
    assert_one_line_error(err)
    assert text in err


def run_script(tmp_path: Path, *argv: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    clean.update(HF_HOME=str(tmp_path / "home"), HF_TOKEN=SECRET, **env)
    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--local_dir", str(tmp_path / "out"), *argv],
        env=clean,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert time.monotonic() - start < 30, "must fail fast, not hang"
    assert SECRET not in result.stdout + result.stderr
    return result


def test_help_documents_flags_and_exit_codes(tmp_path):
    out = run_script(tmp_path, "--help").stdout
    for flag in "--repo_id --local_dir --assets --all --additional_patterns --hf_token".split():
        assert flag in out
    assert "exit codes" in out and "HF_HUB_OFFLINE=1" in out and "safetensors" in out


@pytest.mark.parametrize("env", ["offline", "unreachable"])
def test_real_run_without_network_fails_fast(tmp_path, env):
    if env == "offline":
        result = run_script(tmp_path, "--assets", "tokenizer", HF_HUB_OFFLINE="1")
    else:
        with socket.socket() as sock:  # a port nobody listens on
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        result = run_script(tmp_path, "--all", HF_ENDPOINT=f"http://127.0.0.1:{port}")
    assert result.returncode == dl.EXIT_OFFLINE
    assert_one_line_error(result.stderr)
    assert not (tmp_path / "out").exists()
