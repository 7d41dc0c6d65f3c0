#!/usr/bin/env python
"""Cost of the routing metrics (``train/routing_metrics.py``) per training step.

    python benchmarks/routing_metrics.py                       # debugmodel, cpu
    python benchmarks/routing_metrics.py --device cuda --flavor nano-proxy --dtype bfloat16

One model, one AdamW, the same batch; a training step is forward, backward,
TorchTitan's routing-bias update (its optimizer pre-hook, as the trainer has it)
and the optimizer step. Compared in one process, alternating step by step:

* off: no routing metrics;
* on: the metrics' hooks (counts reduced to the figures on the device in the
  optimizer pre-hook, counts zeroed in a post-hook) and their read-out at log time
  (``RoutingMetrics.metrics``, the one device-to-host copy), every step
  (``metrics.log_freq 1``, the worst case);
* on + heatmap: the same with the heatmap image computed every step (no
  TensorBoard writer here: the image is built, not written).

Printed: median step time of each and the ratio to off (the median of the per-step
ratios). A CPU run's numbers say little about a GPU's.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from torchtitan_nemotron3.model import flavor_args  # noqa: E402
from torchtitan_nemotron3.train.routing_metrics import (  # noqa: E402
    RoutingMetrics,
    RoutingMetricsConfig,
    heatmap_image,
)



def _args(flavor: str, vocab: int | None):
    """A flavor, or ``nano-proxy``: Nano-30B's widths and 128 experts on
    ``benchmarks/cases.py``'s short pattern."""
    if flavor == "nano-proxy":
        from cases import NANO_PROXY_PATTERN

        args = flavor_args("nano-30B").replace(
            num_hidden_layers=None, hybrid_override_pattern=NANO_PROXY_PATTERN
        )
    else:
        args = flavor_args(flavor)
    return args if vocab is None else args.replace(vocab_size=vocab)


def _bias_update(model):
    """TorchTitan's aux-loss-free update on one rank (``register_moe_load_balancing_hook``)."""
    for _, block in model.layers.items():
        if block.moe_enabled:
            moe = block.moe
            counts = moe.tokens_per_expert_E
            delta = moe.load_balance_coeff * torch.sign(counts.mean() - counts)
            moe.expert_bias_E.add_(delta - delta.mean())
            moe.tokens_per_expert_E.zero_()


class _Metrics:
    def __init__(self):
        self.logger = SimpleNamespace(_loggers=[])

    def should_log(self, step):
        return True

    def log(self, step, *args, extra_metrics=None, **kwargs):
        return extra_metrics


def _setup(args, device, dtype, metrics: str):
    from torchtitan_nemotron3.model import build_model_config

    with torch.device("meta"):
        model = build_model_config(args).build()
    model.to_empty(device=device)
    torch.manual_seed(0)
    with torch.no_grad():
        model.init_states()
    model.to(dtype).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    opt.register_step_pre_hook(lambda *_: _bias_update(model))
    trainer = SimpleNamespace(
        model_parts=[model],
        optimizers=opt,
        metrics_processor=_Metrics(),
        step=1,
        parallel_dims=SimpleNamespace(
            ep_enabled=False, pp_enabled=False, tp=1, get_optional_mesh=lambda _: None
        ),
    )
    rm = None
    if metrics != "off":
        rm = RoutingMetrics(trainer, RoutingMetricsConfig(heatmap_freq=0))
    return model, opt, trainer, rm


def _step(model, opt, trainer, rm, ids, metrics, device):
    logits = model(ids)
    loss = torch.nn.functional.cross_entropy(
        logits.flatten(0, 1).float(), ids.flatten()
    )
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    loss_value = loss.item()  # TorchTitan reads the loss at log time anyway
    if rm is not None:
        captured = rm._captured
        out = trainer.metrics_processor.log(trainer.step, loss_value)
        if metrics == "on+heatmap" and captured[2] is not None:
            heatmap_image(captured[2])
        assert out, "no routing figures"
    trainer.step += 1
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--flavor", default="debugmodel")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--vocab", type=int, default=None, help="override the vocabulary")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq_len", type=int, default=256)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--reps", type=int, default=10)
    a = p.parse_args(argv)
    torch.set_flush_denormal(True)
    args = _args(a.flavor, a.vocab)
    kinds = ("off", "on", "on+heatmap")
    dtype = getattr(torch, a.dtype)
    runs = {k: _setup(args, a.device, dtype, k) for k in kinds}
    ids = torch.randint(0, args.vocab_size, (a.batch, a.seq_len), device=a.device)
    times = {k: [] for k in kinds}
    for i in range(a.warmup + a.reps):
        for k in kinds:
            t0 = time.perf_counter()
            _step(*runs[k], ids, k, a.device)
            if i >= a.warmup:
                times[k].append(time.perf_counter() - t0)
    off = statistics.median(times["off"])
    print(
        f"routing metrics, {a.flavor} {a.dtype} on {a.device}, batch {a.batch} x "
        f"{a.seq_len}, "
        f"{a.reps} steps, logged every step\n"
    )
    print("| metrics | step ms | ratio to off |")
    print("|---|---:|---:|")
    for k in kinds:
        ratio = statistics.median(t / o for t, o in zip(times[k], times["off"]))
        print(f"| {k} | {1e3 * statistics.median(times[k]):.2f} | {ratio:.3f} |")
    print(f"\n(off: {1e3 * off:.2f} ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
