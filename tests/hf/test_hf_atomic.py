"""save_pretrained is atomic: a crash never leaves a complete-looking checkpoint and
never damages the one it was replacing."""

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("transformers")

from hf_checkpoints import (  # noqa: E402
    assert_same_tensors,
    save_transformers_checkpoint,
    tiny_args,
)

from torchtitan_nemotron3 import from_pretrained, save_pretrained  # noqa: E402
from torchtitan_nemotron3.hf import writer  # noqa: E402


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    old = from_pretrained(
        save_transformers_checkpoint(root / "a", tiny_args(0), seed=0)
    )
    new = from_pretrained(
        save_transformers_checkpoint(root / "b", tiny_args(0), seed=1)
    )
    return old, new


def snapshot(path) -> dict[str, bytes]:
    return {
        name: open(os.path.join(path, name), "rb").read() for name in os.listdir(path)
    }


def crash_after(n: int):
    """A _save_file that writes ``n`` shards, then dies mid-way through the next."""
    real, calls = writer._save_file, []

    def save_file(tensors, path):
        if len(calls) == n:
            with open(path, "wb") as f:  # a torn write
                f.write(b"\0" * 100)
            raise OSError("disk full (simulated)")
        calls.append(path)
        real(tensors, path)

    return save_file


def test_crash_keeps_the_previous_checkpoint(tmp_path, models, monkeypatch):
    old, new = models
    out = tmp_path / "ckpt"
    save_pretrained(old, out, max_shard_size="40KB")
    before = snapshot(out)

    monkeypatch.setattr(writer, "_save_file", crash_after(2))
    with pytest.raises(OSError, match="disk full"):
        save_pretrained(new, out, max_shard_size="40KB")
    assert snapshot(out) == before
    assert os.listdir(tmp_path) == ["ckpt"]  # the temporary directory is gone

    monkeypatch.undo()
    save_pretrained(new, out, max_shard_size="40KB")  # a completed save replaces it
    assert_same_tensors(from_pretrained(out).state_dict(), new.state_dict())
    assert os.listdir(tmp_path) == ["ckpt"]


def test_crash_on_first_save_leaves_nothing(tmp_path, models, monkeypatch):
    monkeypatch.setattr(writer, "_save_file", crash_after(0))
    with pytest.raises(OSError):
        save_pretrained(models[0], tmp_path / "ckpt")
    assert os.listdir(tmp_path) == []


@pytest.mark.integration
def test_killed_process_leaves_no_complete_looking_directory(tmp_path, models):
    """A hard kill (no cleanup runs) mid-write: the old checkpoint is intact and the
    leftover is a hidden temporary directory without config.json."""
    old, _ = models
    out = tmp_path / "ckpt"
    save_pretrained(old, out, max_shard_size="40KB")
    before = snapshot(out)
    script = textwrap.dedent(
        f"""
        import os
        import torchtitan_nemotron3 as tn
        from torchtitan_nemotron3.hf import writer
        real, done = writer._save_file, []
        def save_file(tensors, path):
            if len(done) == 2:
                os._exit(9)  # killed: no exception handler, no cleanup
            done.append(path)
            real(tensors, path)
        writer._save_file = save_file
        model = tn.from_pretrained({str(out)!r})
        tn.save_pretrained(model, {str(out)!r}, max_shard_size="40KB")
        """
    )
    result = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", script], capture_output=True, check=False
    )
    assert result.returncode == 9, result.stderr.decode()[-2000:]
    assert snapshot(out) == before
    leftovers = [name for name in os.listdir(tmp_path) if name != "ckpt"]
    assert len(leftovers) == 1 and leftovers[0].startswith(".ckpt.tmp-")
    assert "config.json" not in os.listdir(tmp_path / leftovers[0])
    from_pretrained(out)
