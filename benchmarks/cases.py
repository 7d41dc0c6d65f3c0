"""What is timed: the configs (``debug``, ``nano-proxy``) and, per config, one block of
each layer type, the whole model, the head (norm + lm_head + loss), and on CUDA the
bare Mamba2 mixer against mamba-ssm's."""

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from models import build_hf, build_mamba_ssm_mixer, build_ours
from torch import nn

from torchtitan_nemotron3.model import build_model_config, flavor_args
from torchtitan_nemotron3.model.flavors import NANO_30B
from torchtitan_nemotron3.model.flops import nparams_and_flops
from torchtitan_nemotron3.model.pattern import MAMBA

NANO_PROXY_PATTERN = "MEM*EM"


@dataclass
class Case:
    config: str
    name: str
    tokens: int
    flops_per_token: float
    impls: dict = field(default_factory=dict)  # label -> (step fn, params, output fn)


def bench_args(base, **changes):
    """Our args, with transformers' dt clamp (time_step_min, inf) so both compute the same."""
    changes.setdefault("time_step_limit", (base.time_step_min, math.inf))
    return base.replace(num_hidden_layers=None, **changes)


def configs(args) -> dict:
    """``debug``: the ``debugmodel`` flavor. ``nano-proxy``: Nano-30B's widths on a
    short pattern, with ``--experts`` routed experts and a ``--vocab`` vocabulary
    (FLOPs per token of the blocks unchanged)."""
    out = {}
    if "debug" in args.configs:
        out["debug"] = bench_args(flavor_args("debugmodel"))
    if "nano" in args.configs:
        out["nano-proxy"] = bench_args(
            NANO_30B,
            hybrid_override_pattern=NANO_PROXY_PATTERN,
            n_routed_experts=args.experts,
            vocab_size=args.vocab,
        )
    return out


def layer_flops_per_token(layer_cfg, seq_len: int) -> int:
    """Training FLOPs per token of one block, by ``model/flops.py``'s rules."""
    no_head = type("Head", (), {"in_features": 0, "out_features": 0, "bias": False})
    shim = type("Cfg", (), {"lm_head": no_head, "layers": [layer_cfg]})
    return nparams_and_flops(shim, nn.Module(), seq_len)[1]


def block_case(cname, margs, symbol, a, device) -> list[Case]:
    """One block ``h + mixer(norm(h))`` of type ``symbol``, ours and transformers'; for
    ``M`` with 'mixer' in ``--only`` on CUDA, also the bare mixer vs mamba-ssm's."""
    largs = bench_args(margs, hybrid_override_pattern=symbol, vocab_size=256)
    ours_model, cfg = build_ours(largs, a.dtype, device, a.kernel_backend, a.compile)
    hf_model = build_hf(largs, ours_model, a.dtype, device, a.compile_hf)
    ours, hf = ours_model.layers["0"], hf_model.model.layers[0]
    g = torch.Generator(device=device).manual_seed(1)
    shape = (a.batch, a.seq_len, margs.hidden_size)
    h = torch.randn(shape, generator=g, device=device, dtype=a.dtype)
    grad = torch.randn(shape, generator=g, device=device, dtype=a.dtype)

    def impl(fn, module):
        def run(after_forward=None):
            out = fn(h.detach().requires_grad_())
            if after_forward:
                after_forward()
            out.backward(grad)

        return run, [p for p in module.parameters()], lambda: fn(h)

    case = Case(
        cname,
        f"block {symbol}",
        a.batch * a.seq_len,
        layer_flops_per_token(cfg.layers[0], a.seq_len),
    )
    case.impls["ours"] = impl(lambda x: ours(x, None), ours)
    case.impls["transformers"] = impl(lambda x: hf(x), hf)
    if symbol == MAMBA and "mixer" in a.only:
        if device.type != "cuda":
            print("  [mixer] mamba-ssm Mamba2 skipped: needs CUDA")
        else:
            try:
                ref, label = build_mamba_ssm_mixer(ours.mixer, largs, a.dtype, device)
            except Exception as e:  # noqa: BLE001 - report and go on
                print(f"  [mixer] mamba-ssm Mamba2 skipped: {e}")
            else:
                mixer = Case(cname, "mixer M", case.tokens, case.flops_per_token)
                mixer.impls["ours"] = impl(lambda x: ours.mixer(x, None), ours.mixer)
                mixer.impls[label] = impl(lambda x: ref(x), ref)
                return [case, mixer]
    return [case]


def model_case(cname, margs, a, device) -> Case:
    """The whole model, ours and transformers', cross-entropy on the logits."""
    ours, cfg = build_ours(margs, a.dtype, device, a.kernel_backend, a.compile)
    hf = build_hf(margs, ours, a.dtype, device, a.compile_hf)
    g = torch.Generator(device=device).manual_seed(2)
    tokens = torch.randint(
        0, margs.vocab_size, (a.batch, a.seq_len), generator=g, device=device
    )
    labels = torch.randint(
        0, margs.vocab_size, tokens.shape, generator=g, device=device
    )

    def impl(fn, module):
        def run(after_forward=None):
            logits = fn()
            if after_forward:
                after_forward()
            F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten()).backward()

        return run, [p for p in module.parameters()], fn

    case = Case(
        cname,
        f"model {margs.hybrid_override_pattern}",
        a.batch * a.seq_len,
        nparams_and_flops(cfg, ours, a.seq_len)[1],
    )
    case.impls["ours"] = impl(lambda: ours(tokens), ours)
    case.impls["transformers"] = impl(
        lambda: hf(input_ids=tokens, use_cache=False).logits, hf
    )
    return case


def head_case(cname, margs, a, device) -> Case:
    """Ours only: final norm + lm_head + cross-entropy, the part of a step outside the
    blocks (for the full-model estimate)."""
    cfg = build_model_config(margs)
    with torch.device(device):
        norm, lm_head = cfg.norm.build(), cfg.lm_head.build()
    with torch.no_grad():
        norm.weight.fill_(1.0)
        lm_head.weight.normal_(0.0, margs.initializer_range)
    norm, lm_head = norm.to(a.dtype), lm_head.to(a.dtype)
    g = torch.Generator(device=device).manual_seed(3)
    shape = (a.batch, a.seq_len, margs.hidden_size)
    h = torch.randn(shape, generator=g, device=device, dtype=a.dtype)
    labels = torch.randint(0, margs.vocab_size, shape[:2], generator=g, device=device)

    def fwd(x):
        return lm_head(norm(x))

    def run(after_forward=None):
        logits = fwd(h.detach().requires_grad_())
        if after_forward:
            after_forward()
        F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten()).backward()

    case = Case(
        cname, "head", a.batch * a.seq_len, 6 * margs.hidden_size * margs.vocab_size
    )
    case.impls["ours"] = (
        run,
        [*norm.parameters(), *lm_head.parameters()],
        lambda: fwd(h),
    )
    return case
