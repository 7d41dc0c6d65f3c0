"""The debug SFT assets are the bytes the debug SFT run was measured on.

A change to the generated chats, template or tokenizer changes the run's losses: it
needs a new ``SFT_ASSETS_VERSION`` (and new hashes here). A failure with an old
cached directory (built by an earlier version of the code) is cured by deleting it.
"""

import hashlib
from pathlib import Path

from torchtitan_nemotron3.sft.assets import ensure_debug_sft_assets

SHA256 = {
    "chat/train.jsonl": "6f8f866904a3ff24a3228dfd5b955a35a7ff50b69f5062d364b7d02b5b68276d",
    "chat/validation.jsonl": "d66a4ba0d9d05df1415758023372f4553ac904166da18ba61f98b6420793e77e",
    "tokenizer/chat_template.jinja": "58d080d2242ed31cbe9f34f4cff2428923d27387e8603a65de3f7fa8a66dfbe6",
    "tokenizer/tokenizer.json": "0feedb3506e2a3e9a4fe388583a9e6b4747da4c469ca3313a58aadda7ffdb07a",
    "tokenizer/tokenizer_config.json": "435bfd889c5fe6826014812dc9812a666c0aad462b4583bdc77c28c9e44d40fc",
}


def test_assets_bytes():
    root = Path(ensure_debug_sft_assets()[0]).parent
    got = {
        name: hashlib.sha256((root / name).read_bytes()).hexdigest() for name in SHA256
    }
    assert got == SHA256, f"{root}: stale cache or changed generator (see docstring)"
