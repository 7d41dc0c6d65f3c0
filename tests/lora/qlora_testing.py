"""QLoRA test helpers: the debug model with a bf16-rounded base, its NF4 twin,
and the metrics of the issue's step-0 comparison."""

import copy

import torch
import torch.nn.functional as F
from torchtitan.components.optimizer import default_adamw

from torchtitan_nemotron3.lora import NemotronHLoRAConverter
from torchtitan_nemotron3.model import build_model_config, flavor_args
from torchtitan_nemotron3.qlora import quantize_base


def debug_config(rank: int | None = 8, alpha: float = 16.0, flavor="debugmodel"):
    cfg = build_model_config(flavor_args(flavor), kernel_backend="torch")
    if rank is not None:
        cfg = NemotronHLoRAConverter.Config(rank=rank, alpha=alpha).build().convert(cfg)
    return cfg


def build(cfg, seed: int = 0):
    """fp32 CPU model from ``cfg``, initialised as the trainer does; every frozen
    (base) float tensor rounded to bf16 (the released checkpoint's precision)."""
    with torch.device("meta"):
        model = cfg.build()
    model.to_empty(device="cpu")
    torch.manual_seed(seed)
    with torch.no_grad():
        model.init_states()
        for n, p in model.named_parameters():
            if ".lora_" not in n:
                p.copy_(p.bfloat16().float())
    return model


def nf4_twin(model, lm_head: bool = False, chunk=None):
    twin = copy.deepcopy(model)
    for n, p in twin.named_parameters():
        if ".lora_" not in n:
            p.requires_grad_(False)
    quantize_base(twin, lm_head=lm_head, dequant_chunk_experts=chunk)
    return twin


def compare(logits_ref, logits, labels):
    """(rel Frobenius err, KL(ref||x) nats/token, top-1 agreement, CE ref, CE x)."""
    ref, x = logits_ref.float().flatten(0, 1), logits.float().flatten(0, 1)
    rel = ((x - ref).norm() / ref.norm()).item()
    lp_ref, lp = F.log_softmax(ref, -1), F.log_softmax(x, -1)
    kl = (lp_ref.exp() * (lp_ref - lp)).sum(-1).mean().item()
    top1 = (ref.argmax(-1) == x.argmax(-1)).float().mean().item()
    ce_ref = F.cross_entropy(ref, labels.flatten()).item()
    ce = F.cross_entropy(x, labels.flatten()).item()
    return rel, kl, top1, ce_ref, ce


def markov_batch(vocab: int, b: int, seq: int, seed: int, alt: float = 0.0):
    """Rows of a noisy chain over the first ``vocab`` tokens: next = (3·tok + 1)
    mod vocab, or (3·tok + 2) with probability ``alt`` (the fine-tuning task),
    or uniform with probability 0.1: learnt in a few steps, with confident
    logits once learnt."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.empty(b, seq + 1, dtype=torch.long)
    rows[:, 0] = torch.randint(0, vocab, (b,), generator=g)
    u = torch.rand(b, seq, generator=g)
    rand = torch.randint(0, vocab, (b, seq), generator=g)
    for t in range(seq):
        shift = torch.where(u[:, t] < alt, 2, 1)
        nxt = (3 * rows[:, t] + shift) % vocab
        rows[:, t + 1] = torch.where(u[:, t] > 0.9, rand[:, t], nxt)
    return rows


def train(model, batches, lr: float):
    """TorchTitan's AdamW builder (it picks the parameters to train), one step
    per batch (mean CE); returns the optimizers container."""
    opt = default_adamw(lr=lr, weight_decay=0.0).build(model_parts=[model])
    model.train()
    for tok in batches:
        logits = model(tok[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1).float(), tok[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return opt


def eval_loss(model, tok) -> float:
    model.eval()
    with torch.no_grad():
        logits = model(tok[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1).float(), tok[:, 1:].flatten()).item()
