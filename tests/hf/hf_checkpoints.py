"""Tiny hub-format checkpoints written by transformers, and ways to read them back.

transformers is the independent writer: its ``save_pretrained`` output is what the
hub holds, so our reader is tested against it and our writer is compared with it.
"""

import os

import torch
from nemotron_testing import hf_reference, random_args, randomize_
from safetensors import safe_open


def transformers_model(args, seed: int = 0):
    """A random NemotronHForCausalLM for ``args`` (fp32) whose config also carries
    ``args.time_step_limit``, so its config.json describes our model exactly."""
    model = hf_reference(args)
    randomize_(model, seed)
    model.config.time_step_limit = tuple(args.time_step_limit)
    return model


def save_transformers_checkpoint(
    path, args, seed: int = 0, dtype=torch.float32, **kw
) -> str:
    """transformers' ``save_pretrained`` of a random model; bf16 goes through
    ``from_pretrained(dtype=bf16)`` as a user would (the correction bias stays fp32)."""
    path = os.fspath(path)
    model = transformers_model(args, seed)
    if dtype != torch.float32:
        from transformers import AutoModelForCausalLM

        model.save_pretrained(path + ".fp32")
        model = AutoModelForCausalLM.from_pretrained(path + ".fp32", dtype=dtype)
    model.save_pretrained(path, **kw)
    return path


def read_tensors(path) -> dict[str, torch.Tensor]:
    """Every tensor of every safetensors file in a directory, by its key on disk."""
    tensors = {}
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(path, name), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                    assert key not in tensors, f"{key} stored twice"
                    tensors[key] = f.get_tensor(key)
    return tensors


def assert_same_tensors(got: dict, want: dict) -> None:
    """Same names, shapes, dtypes and bits."""
    assert sorted(got) == sorted(want), sorted(set(got) ^ set(want))
    for name, t in want.items():
        assert got[name].dtype == t.dtype, (name, got[name].dtype, t.dtype)
        assert got[name].shape == t.shape, (name, got[name].shape, t.shape)
        assert torch.equal(got[name], t), name


def tiny_args(seed: int = 0, **changes):
    """random_args with every layer type; overrides via ``changes``."""
    args = random_args(seed, num_layers=6)
    return args.replace(**changes) if changes else args
