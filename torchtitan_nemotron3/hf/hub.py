"""A Hugging Face Hub repo id where a local directory is expected.

``from_pretrained("nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-BF16")`` goes through
``huggingface_hub.snapshot_download``: its cache (``HF_HUB_CACHE``), token and
offline mode (``HF_HUB_OFFLINE=1``) apply as for transformers, and only the files
asked for are fetched.
"""

import os
import re

# owner/name, as the Hub spells repo ids; anything else is taken as a local path
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")

MODEL_FILES = ["config.json", "*.safetensors", "model.safetensors.index.json"]


def local_dir(
    path: str | os.PathLike,
    allow_patterns: list[str],
    what: str = "checkpoint directory",
) -> str:
    """``path`` if it is a directory; else, if it reads as ``owner/name``, the Hub
    repo's snapshot (``allow_patterns`` of it) from the cache or downloaded.

    Raises ``FileNotFoundError`` in one line naming ``path``: no such directory,
    or a repo that is neither cached nor downloadable (offline, no network, not
    found, gated); ``NotADirectoryError`` for a file.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        return path
    if os.path.exists(path):
        raise NotADirectoryError(f"{what} {path} is a file, not a directory")
    if not _REPO_ID.fullmatch(path):
        raise FileNotFoundError(f"{what} {path} does not exist")
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return snapshot_download(path, allow_patterns=allow_patterns)
    except (OSError, ValueError, EntryNotFoundError) as e:
        offline = " (HF_HUB_OFFLINE is set)" if constants.HF_HUB_OFFLINE else ""
        reason = (str(e).splitlines() or [type(e).__name__])[0]
        raise FileNotFoundError(
            f"{path!r} is neither a local directory nor a Hugging Face Hub repo in the "
            f"cache {constants.HF_HUB_CACHE} or downloadable{offline}: "
            f"{type(e).__name__}: {reason}"
        ) from None
