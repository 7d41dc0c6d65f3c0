#!/usr/bin/env python
"""Download NemotronH / Nemotron-3 assets (tokenizer, config, weights) from the Hugging Face Hub.

Training only needs the tokenizer and the config; converting or loading a checkpoint also needs
the safetensors index and the weight shards (~60 GB for Nemotron-3-Nano-30B). Fetching them
selectively keeps a tokenizer-only setup small and fast.

Example:
    python scripts/download_hf_assets.py \\
        --repo_id nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-BF16 \\
        --local_dir ./assets/hf/Nemotron-3-Nano-30B --assets tokenizer config index

Design notes:
* The repo listing is fetched first (one API call) so that an ``--assets`` group matching no
  file fails with a clear message *before* anything is downloaded, and so the download is pinned
  to the commit that was listed.
* ``huggingface_hub.snapshot_download`` into ``--local_dir`` does the work and shows tqdm progress
  bars. Resuming is per file: a re-run skips every file already complete at the same commit
  (metadata kept in ``<local_dir>/.cache/huggingface``); within a run, dropped HTTP connections
  are continued with Range requests. huggingface_hub 1.x does not keep a half-written file
  across runs, so an interrupted run re-fetches only the files that were in flight.
* The token is resolved by huggingface_hub (``HF_TOKEN`` or the saved login) unless
  ``--hf_token`` is given; it is never printed, and every message we print is redacted.
* Known failures (gated repo, missing repo/revision, no network, offline mode, unmatched
  ``--assets``) end with a one-line ``error: ...`` and a distinct exit code, not a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import textwrap
import traceback
from collections.abc import Iterable, Sequence
from pathlib import Path

import httpx
from huggingface_hub import HfApi, constants, get_token, snapshot_download
from huggingface_hub.errors import (
    DisabledRepoError,
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import filter_repo_objects

DEFAULT_REPO_ID = "nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-BF16"

# Glob patterns per asset group, matched like huggingface_hub's allow_patterns (fnmatch, where
# `*` also crosses `/`), so the files we list are exactly the ones snapshot_download fetches.
ASSET_PATTERNS: dict[str, tuple[str, ...]] = {
    "tokenizer": (
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "added_tokens.json",
        "tokenizer.model",
        "*.tiktoken",
        "vocab.json",
        "merges.txt",
        "chat_template.jinja",
        "chat_template.json",
    ),
    "config": ("config.json", "generation_config.json"),
    "index": ("model.safetensors.index.json",),
    "safetensors": ("*.safetensors",),
}

ASSET_HELP: dict[str, str] = {
    "tokenizer": "tokenizer files (tokenizer.json, tokenizer_config.json, special_tokens_map.json, "
    "added_tokens.json, tokenizer.model, *.tiktoken, vocab.json, merges.txt, chat_template.jinja/.json)",
    "config": "model config (config.json, generation_config.json)",
    "index": "safetensors weight map (model.safetensors.index.json)",
    "safetensors": "weight shards (*.safetensors); large",
}

# Distinct exit codes let wrapper scripts react (e.g. retry on network errors only).
EXIT_ERROR = 1
EXIT_ACCESS = 3
EXIT_NOT_FOUND = 4
EXIT_NETWORK = 5
EXIT_NO_MATCH = 6
EXIT_INTERRUPTED = 130

# The Hub API call has no timeout by default; without one a black-holed network hangs forever.
DEFAULT_TIMEOUT_S = 30.0


class NoMatchingFilesError(Exception):
    """An ``--assets`` group matched no file in the repo (typo'd repo, or a different layout)."""

    def __init__(self, asset: str, patterns: Sequence[str]) -> None:
        self.asset = asset
        self.patterns = tuple(patterns)
        super().__init__(f"--assets {asset} matches no file (patterns: {', '.join(patterns)})")


def select_patterns(assets: Iterable[str], all_: bool) -> list[str] | None:
    """Return the allow_patterns for snapshot_download; None means every file (``--all``).

    Kept pure (no network) so the selection can be unit-tested against a fake repo listing.
    """
    if all_:
        return None
    patterns: list[str] = []
    for asset in assets:
        if asset not in ASSET_PATTERNS:
            raise ValueError(f"unknown asset group {asset!r}; choose from {', '.join(ASSET_PATTERNS)}")
        patterns.extend(p for p in ASSET_PATTERNS[asset] if p not in patterns)
    return patterns


def select_files(repo_files: Iterable[str], assets: Iterable[str], all_: bool) -> list[str]:
    """Return the sorted repo files to download, failing if a requested group matches nothing.

    Each group is checked separately: "tokenizer config" on a repo without a tokenizer must fail
    even though "config" alone would match something.
    """
    files = sorted(set(repo_files))
    if all_:
        if not files:
            raise NoMatchingFilesError("all", ("*",))
        return files
    selected: set[str] = set()
    for asset in dict.fromkeys(assets):  # de-duplicate, keep order for the error message
        patterns = select_patterns([asset], all_=False) or []
        matched = list(filter_repo_objects(files, allow_patterns=patterns))
        if not matched:
            raise NoMatchingFilesError(asset, patterns)
        selected.update(matched)
    return sorted(selected)


def redact(text: str, secrets: Iterable[str | None]) -> str:
    """Remove secrets from text we print, as a safety net should any message ever embed one."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


def _status_code(exc: HfHubHTTPError) -> int | None:
    """HTTP status of a Hub error, if a response is attached."""
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def _error_chain(exc: BaseException) -> list[BaseException]:
    """The exception and its causes: huggingface_hub often wraps the real reason (e.g. a
    connection error inside LocalEntryNotFoundError)."""
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in chain:
        chain.append(current)
        implicit = None if current.__suppress_context__ else current.__context__
        current = current.__cause__ or implicit
    return chain


def describe_error(exc: BaseException, repo_id: str, revision: str) -> tuple[int, str] | None:
    """Map a known failure to (exit code, one-line message); None for unexpected errors.

    Messages are our own text plus the exception *type* (and, for local file errors, the OS
    reason and path), never the exception's message, so no header or token can leak through.
    """
    chain = _error_chain(exc)
    for err in chain:
        # GatedRepoError subclasses RepositoryNotFoundError: check it first.
        if isinstance(err, GatedRepoError):
            return EXIT_ACCESS, (
                f"{repo_id} is a gated repo and this account has no access: accept its terms at "
                f"{constants.ENDPOINT}/{repo_id} and provide a token with read access "
                "(HF_TOKEN, `hf auth login` or --hf_token)"
            )
        if isinstance(err, RevisionNotFoundError):
            return EXIT_NOT_FOUND, f"revision {revision!r} not found in {repo_id}"
        if isinstance(err, RepositoryNotFoundError):
            return EXIT_NOT_FOUND, (
                f"repo {repo_id} not found, or it is private and no valid token was given "
                "(HF_TOKEN, `hf auth login` or --hf_token)"
            )
        if isinstance(err, DisabledRepoError):
            return EXIT_ACCESS, f"repo {repo_id} has been disabled by its owner"
    for err in chain:
        if isinstance(err, OfflineModeIsEnabled):
            return EXIT_NETWORK, "offline mode is enabled (HF_HUB_OFFLINE=1): unset it to download from the Hub"
        if isinstance(err, (httpx.TransportError, ConnectionError, TimeoutError)):
            return EXIT_NETWORK, (
                f"cannot reach the Hugging Face Hub at {constants.ENDPOINT} ({type(err).__name__}): "
                "check the network connection, proxy settings or HF_ENDPOINT, then re-run to resume"
            )
    for err in chain:
        if isinstance(err, HfHubHTTPError):
            return _describe_http_error(err, repo_id)
        if isinstance(err, HFValidationError):
            return EXIT_ERROR, f"invalid --repo_id {repo_id!r} (expected 'namespace/name')"
        if isinstance(err, LocalEntryNotFoundError):
            # Raised when the Hub was unreachable and no local copy exists.
            if constants.is_offline_mode():
                return EXIT_NETWORK, "offline mode is enabled (HF_HUB_OFFLINE=1): unset it to download from the Hub"
            return EXIT_NETWORK, (
                f"cannot reach the Hugging Face Hub at {constants.ENDPOINT} and the files are not "
                "available locally: check the network connection, then re-run to resume"
            )
    for err in chain:
        if isinstance(err, OSError) and err.strerror:
            # Typically ENOSPC / EACCES while writing a multi-GB shard: resumable once fixed.
            where = f" ({err.filename})" if err.filename else ""
            return EXIT_ERROR, f"local file error: {err.strerror}{where}; fix it and re-run to resume"
    return None


def _describe_http_error(err: HfHubHTTPError, repo_id: str) -> tuple[int, str]:
    """Messages for Hub HTTP errors that are not a missing/gated repo or revision."""
    status = _status_code(err)
    if status == 401:
        return EXIT_ACCESS, "the Hub rejected the token (HTTP 401): check HF_TOKEN / --hf_token"
    if status == 403:
        return EXIT_ACCESS, f"the token lacks permission to read {repo_id} (HTTP 403)"
    if status == 429:
        return EXIT_NETWORK, "rate-limited by the Hub (HTTP 429): wait a bit and re-run to resume"
    if status is not None and status >= 500:
        return EXIT_NETWORK, f"the Hub is unavailable (HTTP {status}): re-run later to resume"
    return EXIT_ERROR, f"Hub request failed (HTTP {status}, {type(err).__name__})"


def build_parser() -> argparse.ArgumentParser:
    """CLI definition; --help lists what each asset group contains."""
    groups = "\n".join(
        textwrap.fill(text, width=96, initial_indent=f"  {name:<12} ", subsequent_indent=" " * 15)
        for name, text in ASSET_HELP.items()
    )
    parser = argparse.ArgumentParser(
        description="Download Nemotron-3 / NemotronH assets from the Hugging Face Hub "
        "(resumable; re-running skips completed files).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            f"asset groups (--assets):\n{groups}\n  --all        every file in the repo\n\n"
            "token: read from HF_TOKEN or the saved `hf auth login` token unless --hf_token is given;\n"
            "it is never printed.\n\n"
            f"exit codes: 0 ok, {EXIT_ERROR} other error, 2 usage, {EXIT_ACCESS} gated/no access, "
            f"{EXIT_NOT_FOUND} repo/revision not found,\n"
            f"  {EXIT_NETWORK} network/offline, {EXIT_NO_MATCH} an --assets group matched no file, "
            f"{EXIT_INTERRUPTED} interrupted"
        ),
    )
    parser.add_argument("--repo_id", default=DEFAULT_REPO_ID, help="Hub model repo (default: %(default)s)")
    parser.add_argument("--revision", default="main", help="branch, tag or commit (default: %(default)s)")
    parser.add_argument(
        "--local_dir",
        type=Path,
        default=None,
        help="destination folder (default: ./assets/hf/<repo name>)",
    )
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument(
        "--assets",
        nargs="+",
        choices=list(ASSET_PATTERNS),
        metavar="ASSET",
        help=f"one or more of: {', '.join(ASSET_PATTERNS)} (see below)",
    )
    what.add_argument("--all", action="store_true", help="download every file, including the safetensors weights")
    parser.add_argument(
        "--hf_token",
        default=None,
        help="Hub token (prefer the HF_TOKEN env var: command-line args are visible in `ps` and shell history)",
    )
    parser.add_argument(
        "--max_workers",
        type=_positive_int,
        default=8,
        help="files downloaded in parallel (default: %(default)s)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        help="seconds to wait for the Hub API before failing (default: %(default)s)",
    )
    parser.add_argument("--dry_run", action="store_true", help="list the files that would be downloaded, then exit")
    return parser


def _format_size(num_bytes: int) -> str:
    """Human-readable size (decimal units, as the Hub shows them) for the summary line."""
    if num_bytes < 1000:
        return f"{num_bytes} B"
    size = float(num_bytes)
    for unit in ("KB", "MB", "GB", "TB"):
        size /= 1000
        if size < 1000 or unit == "TB":
            break
    return f"{size:.1f} {unit}"


def _positive_int(text: str) -> int:
    """argparse type: a worker count of 0 would make snapshot_download hang or fail obscurely."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return value


def _warn_if_low_disk(local_dir: Path, needed: int) -> None:
    """Warn (not fail: the check is approximate) when the weights will not fit on the disk."""
    probe = local_dir
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if needed > free:
        print(
            f"warning: {_format_size(needed)} to fetch but only {_format_size(free)} free under {probe}",
            file=sys.stderr,
        )


def download(args: argparse.Namespace) -> int:
    """List the repo, validate the selection, then download it pinned to the listed commit."""
    token = args.hf_token or None  # None: huggingface_hub resolves HF_TOKEN / saved login itself
    local_dir: Path = args.local_dir or Path("assets/hf") / args.repo_id.split("/")[-1]

    info = HfApi().repo_info(
        args.repo_id, revision=args.revision, files_metadata=True, token=token, timeout=args.timeout
    )
    sizes = {s.rfilename: (s.size or 0) for s in (info.siblings or [])}
    files = select_files(sizes, args.assets or [], args.all)
    total = sum(sizes[f] for f in files)
    missing = sum(sizes[f] for f in files if not (local_dir / f).is_file())
    commit = info.sha or args.revision
    print(
        f"{args.repo_id}@{args.revision} ({commit[:12]}): {len(files)} files, {_format_size(total)} "
        f"({_format_size(missing)} not yet in {local_dir})"
    )
    if args.dry_run:
        for name in files:
            print(f"  {name}  ({_format_size(sizes[name])})")
        return 0

    _warn_if_low_disk(local_dir, missing)
    path = snapshot_download(
        args.repo_id,
        revision=commit,  # pinned: a branch moving mid-download cannot mix two commits
        local_dir=local_dir,
        allow_patterns=select_patterns(args.assets or [], args.all),
        token=token,
        max_workers=args.max_workers,
    )
    print(f"done: {path}")
    return 0


def _known_secrets(args: argparse.Namespace) -> list[str]:
    """Every token value that could end up in a message, for redaction."""
    secrets = [args.hf_token, os.environ.get("HF_TOKEN"), os.environ.get("HUGGING_FACE_HUB_TOKEN")]
    with contextlib.suppress(Exception):  # get_token may raise (e.g. a failed OIDC exchange)
        secrets.append(get_token())  # also covers the saved `hf auth login` token
    return [s for s in secrets if s]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: run the download and turn known failures into one-line errors."""
    args = build_parser().parse_args(argv)
    secrets = _known_secrets(args)
    try:
        return download(args)
    except KeyboardInterrupt:
        print("error: interrupted; re-run the same command to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    except NoMatchingFilesError as exc:
        message = f"{exc} in {args.repo_id}@{args.revision}"
        print(redact(f"error: {message}", secrets), file=sys.stderr)
        return EXIT_NO_MATCH
    except Exception as exc:  # noqa: BLE001 - the top-level handler that keeps tracebacks out
        described = describe_error(exc, args.repo_id, args.revision)
        if described is None:
            # Unexpected: keep the traceback for debugging, but redacted like everything else.
            trace = "".join(traceback.format_exception(exc))
            print(redact(trace, secrets), end="", file=sys.stderr)
            return EXIT_ERROR
        code, message = described
        print(redact(f"error: {message}", secrets), file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
