#!/usr/bin/env python
"""Download Nemotron-3 / NemotronH files (tokenizer, config, weights) from the Hugging Face Hub.

Training needs only the tokenizer and config; converting a checkpoint also needs the weights
(~60 GB for Nano-30B), so asset groups are fetched selectively. Flags follow TorchTitan's own
download script: files go to <local_dir>/<model name>/, e.g. with the defaults
./assets/hf/NVIDIA-Nemotron-3-Nano-30B-A3B-BF16/, where the Nano config looks for them.

The repo is listed first, so a group that matches no file fails before anything is fetched,
and the download is pinned to the listed commit. huggingface_hub.snapshot_download does the
rest; re-running skips files already complete. The token comes from --hf_token, else from
HF_TOKEN or the saved `hf auth login`, and is never printed. Failures print one line:

exit codes:
  0  success              3  not authorized (gated repo, HTTP 401/403)
  1  other error          4  repository or revision not found
  2  bad usage            5  offline or Hub unreachable (incl. HF_HUB_OFFLINE=1, HTTP 5xx)
  6  an --assets group (or --additional_patterns) matched no file in the repo
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import httpx
from huggingface_hub import HfApi, get_token, snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import filter_repo_objects

DEFAULT_REPO_ID = "nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-BF16"
LOCAL_DIR_HELP = "files go to LOCAL_DIR/<repo name>/ (default: assets/hf)"
ASSETS = {  # allow_patterns per group, matched by fnmatch as in snapshot_download
    "tokenizer": (
        "tokenizer.json tokenizer_config.json special_tokens_map.json added_tokens.json "
        "chat_template.jinja chat_template.json tokenizer.model *.tiktoken "
        "vocab.json vocab.txt merges.txt"
    ).split(),
    "config": ["config.json", "generation_config.json"],
    "index": ["*.safetensors.index.json"],
    "safetensors": ["*.safetensors"],
}
EXIT_OTHER, EXIT_AUTH, EXIT_NOT_FOUND, EXIT_OFFLINE, EXIT_NO_MATCH = 1, 3, 4, 5, 6


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=fmt)
    parser.add_argument("--repo_id", default=DEFAULT_REPO_ID, help="default: %(default)s")
    parser.add_argument("--revision", default="main", help="branch, tag or commit")
    parser.add_argument("--local_dir", type=Path, default=Path("assets/hf"), help=LOCAL_DIR_HELP)
    what = parser.add_mutually_exclusive_group()
    what.add_argument(
        "--assets", nargs="+", choices=ASSETS, default=[], metavar="ASSET", help=" | ".join(ASSETS)
    )
    what.add_argument("--all", action="store_true", help="every file in the repo")
    parser.add_argument("--additional_patterns", nargs="+", default=[], metavar="GLOB")
    parser.add_argument("--hf_token", help="default: HF_TOKEN or the saved login")
    args = parser.parse_args(argv)
    if not (args.assets or args.all or args.additional_patterns):
        parser.error("give --assets, --all or --additional_patterns")
    return args


def describe(exc: BaseException, args: argparse.Namespace) -> tuple[int, str]:
    """Exit code and message for a failure, in our own words so that no token can leak."""
    chain, err = [], exc
    while err is not None and err not in chain:  # huggingface_hub wraps the real cause
        chain.append(err)
        err = err.__cause__ or err.__context__
    repo = f"{args.repo_id}@{args.revision}"
    for err in chain:
        status = err.response.status_code if isinstance(err, HfHubHTTPError) else 0
        if isinstance(err, GatedRepoError) or (
            status in (401, 403) and not isinstance(err, RepositoryNotFoundError)
        ):
            return EXIT_AUTH, f"not authorized for {repo}: accept its terms, set HF_TOKEN"
        if isinstance(err, (RepositoryNotFoundError, RevisionNotFoundError)):
            return EXIT_NOT_FOUND, f"{repo} not found (or private and no valid token given)"
        if isinstance(err, OfflineModeIsEnabled):
            return EXIT_OFFLINE, "offline mode is on (HF_HUB_OFFLINE=1); unset it to download"
        if isinstance(err, httpx.TransportError) or status >= 500:
            return EXIT_OFFLINE, f"cannot reach the Hub ({type(err).__name__}); re-run to resume"
    if isinstance(exc, LocalEntryNotFoundError):  # snapshot_download: offline, nothing local
        return EXIT_OFFLINE, "cannot reach the Hub and the files are not on disk"
    if isinstance(exc, HfHubHTTPError):
        return EXIT_OTHER, f"Hub request for {repo} failed (HTTP {exc.response.status_code})"
    if isinstance(exc, OSError) and exc.strerror:  # disk full, permission denied, ...
        return EXIT_OTHER, f"{exc.strerror}: {exc.filename or ''}"
    secrets = [args.hf_token]
    with contextlib.suppress(Exception):  # the token huggingface_hub used; OIDC may raise
        secrets.append(get_token())
    message = " ".join(f"{type(exc).__name__}: {exc}".split())  # unexpected: keep it, on one line
    for secret in filter(None, secrets):
        message = message.replace(secret, "***")
    return EXIT_OTHER, message


def download(args: argparse.Namespace) -> int:
    dest = args.local_dir / args.repo_id.split("/")[-1]
    info = HfApi().repo_info(args.repo_id, revision=args.revision, token=args.hf_token, timeout=30)
    files = [s.rfilename for s in info.siblings or []]
    groups = {"--all": ["*"]} if args.all else {name: ASSETS[name] for name in args.assets}
    if args.additional_patterns and not args.all:
        groups["--additional_patterns"] = args.additional_patterns
    unmatched = [
        g for g, pats in groups.items() if not any(filter_repo_objects(files, allow_patterns=pats))
    ]
    if unmatched:
        where = f"{args.repo_id}@{args.revision}"
        print(f"error: {', '.join(unmatched)} matched no file in {where}", file=sys.stderr)
        return EXIT_NO_MATCH
    patterns = None if args.all else [p for group in groups.values() for p in group]
    print(f"downloading {args.repo_id}@{info.sha} ({', '.join(groups)}) to {dest}")
    path = snapshot_download(
        args.repo_id,
        revision=info.sha,
        local_dir=dest,
        allow_patterns=patterns,
        token=args.hf_token,
    )
    print(f"files are in {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return download(args)
    except KeyboardInterrupt:
        print("error: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - every failure becomes one line, not a traceback
        code, message = describe(exc, args)
        print(f"error: {message}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
