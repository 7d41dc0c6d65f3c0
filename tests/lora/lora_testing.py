"""LoRA test helpers: a small random NemotronH (every layer type, transformers-
compatible), its LoRA version with the base weights of the plain one, a few
training steps through TorchTitan's optimizer builder."""

import torch
import torch.nn.functional as F
from nemotron_testing import build_model, random_args, randomize_
from torchtitan.components.optimizer import default_adamw

from torchtitan_nemotron3.lora import NemotronHLoRAConverter
from torchtitan_nemotron3.model import build_model_config

RANK, ALPHA = 4, 8.0


def args_for_test(seed: int = 0):
    return random_args(seed, num_layers=6)


def lora_config(args, rank: int = RANK, alpha: float = ALPHA, **kw):
    """The converted config tree (``kernel_backend`` "torch": CPU, exact)."""
    cfg = build_model_config(args, kernel_backend="torch")
    conv = NemotronHLoRAConverter.Config(rank=rank, alpha=alpha, **kw).build()
    return conv.convert(cfg)


def base_and_lora(args, seed: int = 0, **kw):
    """(plain model with random unit-scale weights, LoRA model holding the same base
    weights and freshly initialised adapters: A random, B = 0), fp32 CPU."""
    base = build_model(args, seed=seed, kernel_backend="torch")
    randomize_(base, seed)
    cfg = lora_config(args, **kw)
    with torch.device("meta"):
        lora = cfg.build()
    lora.to_empty(device="cpu")
    torch.manual_seed(seed + 1)
    with torch.no_grad():
        lora.init_states()
    missing, unexpected = lora.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected
    assert all(".lora_a." in k or ".lora_b." in k for k in missing), missing
    return base, lora


def batch(args, seed: int = 0, b: int = 2, seq: int = 24):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, args.vocab_size, (b, seq + 1), generator=g)


def optimizer_for(model):
    """TorchTitan's own optimizer builder (catch-all AdamW group)."""
    return default_adamw(lr=1e-2).build(model_parts=[model])


def train_steps(model, args, steps: int = 3, seed: int = 0):
    opt = optimizer_for(model)
    model.train()
    losses = []
    for step in range(steps):
        tokens = batch(args, seed + step)
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return opt, losses
