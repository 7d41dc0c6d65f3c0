"""Tiny hub-format checkpoints written by transformers, and ways to read them back.

transformers is the independent writer: its ``save_pretrained`` output is what the
hub holds, so our reader is tested against it and our writer is compared with it.
"""

import itertools
import json
import os

import torch
import torch.nn.functional as F
from nemotron_testing import hf_reference, random_args, randomize_
from safetensors import safe_open

from torchtitan_nemotron3.hf.naming import keep_fp32


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


def assert_like_transformers(ours: dict, theirs: dict, values: bool = True) -> None:
    """Our export against transformers' ``save_pretrained`` of the same model: the
    same names and shapes, and the same dtypes, except that the router (which we
    always write in fp32) may be fp32 where the installed transformers writes bf16
    (<= 5.23 keeps only the correction bias in fp32, 5.24 the gate too). With
    ``values``, equal bits once ours is cast to transformers' dtype."""
    assert sorted(ours) == sorted(theirs), sorted(set(ours) ^ set(theirs))
    for name, want in theirs.items():
        got = ours[name]
        assert got.shape == want.shape, (name, got.shape, want.shape)
        if got.dtype != want.dtype:
            assert keep_fp32(name) and got.dtype == torch.float32, (
                name,
                got.dtype,
                want.dtype,
            )
        if values:
            assert torch.equal(got.to(want.dtype), want), name


def write_tiny_assets(path) -> str:
    """A tokenizer (word-level, 6 words, built with ``tokenizers``), its config,
    a chat template and a generation config, as a hub repo holds them."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    path = os.fspath(path)
    os.makedirs(path)
    words = ["<unk>", "<s>", "</s>", "hello", "mamba", "world", "user", "assistant"]
    tokenizer = Tokenizer(
        models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>")
    )
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(os.path.join(path, "tokenizer.json"))
    files = {
        "tokenizer_config.json": {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": "<s>",
            "eos_token": "</s>",
            "unk_token": "<unk>",
            "pad_token": "<unk>",
        },
        "special_tokens_map.json": {"bos_token": "<s>", "eos_token": "</s>"},
        "generation_config.json": {
            "bos_token_id": 1,
            "eos_token_id": 2,
            "pad_token_id": 0,
            "max_new_tokens": 7,
        },
    }
    for name, content in files.items():
        with open(os.path.join(path, name), "w") as f:
            json.dump(content, f)
    with open(os.path.join(path, "chat_template.jinja"), "w") as f:
        f.write(
            "{% for m in messages %}<s> {{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"
        )
    return path


def tiny_args(seed: int = 0, **changes):
    """random_args with every layer type; overrides via ``changes``."""
    args = random_args(seed, num_layers=6)
    return args.replace(**changes) if changes else args


def first_batch(seq_len: int, batch: int, blend: str | None = None):
    """The batch the debug job's dataloader (the pretraining loader over the
    pre-tokenized debug corpus, or over ``blend``) gives a single rank first:
    (tokens, positions, labels)."""
    import dataclasses

    from torchtitan.components.tokenizer import HuggingFaceTokenizer

    from torchtitan_nemotron3.config_registry import nemotron3_debugmodel

    config = nemotron3_debugmodel()
    dl = config.dataloader
    if blend is not None:
        dl = dataclasses.replace(dl, blend=blend)
    loader = dl.build(
        dp_world_size=1,
        dp_rank=0,
        tokenizer=HuggingFaceTokenizer(tokenizer_path=config.hf_assets_path),
        seq_len=seq_len,
        local_batch_size=batch,
    )
    inputs, labels = next(iter(loader))
    return inputs["input"], inputs["positions"], labels


def transformers_loss(path, tokens, positions, labels) -> float:
    """transformers' mean next-token cross-entropy, each packed document run on its
    own (its Mamba path ignores document boundaries)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path)
    total, count = 0.0, 0
    with torch.no_grad():
        for row in range(tokens.shape[0]):
            starts = (positions[row] == 0).nonzero().flatten().tolist()
            bounds = sorted({0, *starts, tokens.shape[1]})
            for lo, hi in itertools.pairwise(bounds):
                logits = model(tokens[row : row + 1, lo:hi]).logits[0]
                total += F.cross_entropy(
                    logits, labels[row, lo:hi], reduction="sum"
                ).item()
                count += hi - lo
    return total / count
