"""The ``auto`` backend: the default, exactly the torch path on CPU, loads nothing
there, logs its choice once, and falls back per op."""

import dataclasses
import logging
import sys

import pytest
import torch
from _kernel_helpers import build, mamba_args, mamba_inputs, packed_positions

from torchtitan_nemotron3 import model_registry
from torchtitan_nemotron3.ops import AutoMambaOps, CudaMambaOps, TorchMambaOps, mamba_ops
from torchtitan_nemotron3.ops.kernel_ops import conv_ineligible, ssd_ineligible, ssd_pieces
from reference_kernels import REFERENCE_CONV, REFERENCE_SSD, use_kernels
from torchtitan_nemotron3.model import build_model_config

from torchtitan_nemotron3.model.pattern import MAMBA

EXTENSIONS = ("selective_scan_cuda", "causal_conv1d_cuda")
PACKAGES = ("mamba_ssm", "causal_conv1d")


def mamba_mixers(model):
    return [b.mixer for b in model.layers.values() if b.layer_type == MAMBA]


def step(model, tokens, positions):
    logits = model(tokens, positions=positions)
    logits.pow(2).mean().backward()
    return logits.detach(), {n: p.grad for n, p in model.named_parameters()}


def test_auto_is_the_default():
    assert build_model_config(mamba_args()).layers[0].mixer.kernel_backend == "auto"
    for flavor in ("debugmodel", "nano-30B"):
        spec = model_registry(flavor)
        backends = {
            l.mixer.kernel_backend for l in spec.model.layers if l.layer_type == MAMBA
        }
        assert backends == {"auto"}
    assert (
        model_registry("debugmodel", kernel_backend="torch")
        .model.layers[0]
        .mixer.kernel_backend
        == "torch"
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only path")
def test_auto_on_cpu_is_the_torch_path_and_imports_nothing(module_sandbox):
    assert not any(m in sys.modules for m in EXTENSIONS + PACKAGES)
    args = mamba_args()
    tokens = torch.randint(0, args.vocab_size, (2, 45))
    positions = packed_positions(2, [12, 20, 13])
    ours = build(args)
    assert all(isinstance(m.ops, AutoMambaOps) for m in mamba_mixers(ours))
    logits, grads = step(ours, tokens, positions)
    ref_logits, ref_grads = step(build(args, "torch"), tokens, positions)
    assert torch.equal(logits, ref_logits)
    assert all(torch.equal(grads[n], g) for n, g in ref_grads.items())
    assert not any(m in sys.modules for m in EXTENSIONS + PACKAGES)


def test_auto_logs_its_choice_once(caplog):
    args = mamba_args()
    model = build(args)
    tokens = torch.randint(0, args.vocab_size, (1, 20))
    with use_kernels(), caplog.at_level(logging.INFO):  # (forgets earlier log lines)
        for _ in range(3):
            model(tokens)
    lines = [
        r.getMessage()
        for r in caplog.records
        if "kernel_backend='auto'" in r.getMessage()
    ]
    assert lines == [
        (
            "Mamba2 ops (kernel_backend='auto', cpu): conv -> torch (tensors on cpu); "
            "SSD -> torch (tensors on cpu)"
        )
    ]


def test_auto_falls_back_per_op_and_per_call(caplog):
    """With only an SSD kernel (that runs on CPU), auto takes it and keeps torch's conv;
    a call the kernel cannot take (fp64) goes to torch, with its own log line."""
    calls = []

    def counted_fwd(*args, **kwargs):
        calls.append("ssd")
        return REFERENCE_SSD.fwd(*args, **kwargs)

    ssd = dataclasses.replace(REFERENCE_SSD, fwd=counted_fwd)
    auto = mamba_ops("auto")
    with use_kernels(ssd=ssd, conv=None), caplog.at_level(logging.INFO):
        for dtype in (torch.float32, torch.float64):
            inp = mamba_inputs(dtype=dtype)
            auto.conv(
                inp["xBC_BLX"], inp["weight_XK"], inp["bias_X"], inp["seq_idx_BL"]
            )
            auto.scan(
                inp["x_BLHP"],
                inp["dt_BLH"],
                inp["A_H"].to(dtype),
                inp["B_BLGN"],
                inp["C_BLGN"],
                D_H=inp["D_H"],
                dt_bias_H=inp["dt_bias_H"],
                dt_limit=(0.0, float("inf")),
                chunk_size=16,
                seq_idx_BL=inp["seq_idx_BL"],
            )
    assert calls == ["ssd"]
    lines = [
        r.getMessage()
        for r in caplog.records
        if "kernel_backend='auto'" in r.getMessage()
    ]
    assert lines == [
        (
            "Mamba2 ops (kernel_backend='auto', cpu): conv -> torch (disabled by test); "
            "SSD -> kernel (reference SSD: torch stand-in (tests/kernels/reference_kernels.py))"
        ),
        "Mamba2 ssd (kernel_backend='auto', cpu): torch for dtype torch.float64",
    ]


def test_the_cuda_backend_is_strict():
    inp = mamba_inputs()
    cuda = CudaMambaOps()
    scan_kwargs = {
        "D_H": inp["D_H"],
        "dt_bias_H": inp["dt_bias_H"],
        "dt_limit": (0.0, float("inf")),
        "chunk_size": 16,
        "seq_idx_BL": None,
    }
    scan_args = [inp[n] for n in ("x_BLHP", "dt_BLH", "A_H", "B_BLGN", "C_BLGN")]
    with use_kernels(ssd=None, conv=None):
        with pytest.raises(RuntimeError, match="no causal conv kernel"):
            cuda.conv(inp["xBC_BLX"], inp["weight_XK"], inp["bias_X"], None)
        with pytest.raises(RuntimeError, match="the SSD kernel is not usable"):
            cuda.scan(*scan_args, **scan_kwargs)
    with use_kernels(ssd=REFERENCE_SSD, conv=REFERENCE_CONV):
        with pytest.raises(RuntimeError, match="causal-conv1d cannot take 12 conv channels, not a multiple of 8"):
            cuda.conv(inp["xBC_BLX"][..., :12], inp["weight_XK"][:12], None, None)
        with pytest.raises(ValueError, match="dtype torch.float64"):
            cuda.scan(*[a.double() for a in scan_args], **scan_kwargs)


def test_backend_names():
    assert mamba_ops("cuda").name == "cuda"
    with pytest.raises(ValueError, match=r"kernel_backend='triton': choose one of"):
        mamba_ops("triton")
    with pytest.raises(ValueError, match="Mamba2Mixer kernel_backend='triton'"):
        build_model_config(mamba_args(), kernel_backend="triton")


def nano_mixer_views(Bsz: int, L: int):
    """Meta tensors laid out as Nano-30B's mixer slices them out of ``in_proj``."""
    H, P, G, N = 64, 64, 8, 128
    d_inner, GN = H * P, G * N
    proj = torch.empty(
        Bsz, L, 2 * d_inner + 2 * GN + H, device="meta", dtype=torch.bfloat16
    )
    _z, xBC, dt = proj.split([d_inner, d_inner + 2 * GN, H], dim=-1)
    x, B, C = xBC.split([d_inner, GN, GN], dim=-1)
    weight = torch.empty(d_inner + 2 * GN, 4, device="meta", dtype=torch.bfloat16)
    views = (
        x.unflatten(-1, (H, P)),
        dt,
        B.unflatten(-1, (G, N)),
        C.unflatten(-1, (G, N)),
    )
    return xBC, weight, views


def test_calls_past_32_bit_offsets_are_cut_into_pieces():
    """mamba issue #1015: the kernels' 32-bit offsets; Nano-30B's in_proj rows are
    10304 wide, so B·L ≥ 208,414 tokens per call would overflow. Such SSD calls stay
    on the kernel in pieces that each fit; conv calls go to fla-core's conv."""
    for Bsz, L in ((1, 8192), (8, 8192), (2, 65536)):
        xBC, weight, views = nano_mixer_views(Bsz, L)
        assert conv_ineligible(xBC, weight) == ""
        assert ssd_ineligible(*views, chunk_size=128) == ""
    xBC, weight, views = nano_mixer_views(4, 65536)
    assert "past the kernels' 32-bit arithmetic" in conv_ineligible(xBC, weight)
    assert "past the kernels' 32-bit arithmetic" in ssd_ineligible(
        *views, chunk_size=128
    )
    (rows, seqs), why = ssd_pieces(*views, chunk_size=128)
    assert why == "" and rows == [0, 2, 4] and seqs == [0, 65536]  # two rows a call
    for r0, r1 in zip(rows, rows[1:]):
        for s0, s1 in zip(seqs, seqs[1:]):
            piece = [v[r0:r1, s0:s1] for v in views]
            assert ssd_ineligible(*piece, chunk_size=128) == ""
    (rows, seqs), _ = ssd_pieces(*nano_mixer_views(1, 2**20)[2], chunk_size=128)
    assert rows == [0, 1] and len(seqs) > 2  # a 1M-token row


def test_one_kernel_backend_knob_everywhere(tmp_path):
    """model_registry, the job file / command line and from_pretrained take the same
    names and set every Mamba2 mixer; an unknown name is refused where it is given."""
    from torchtitan_nemotron3 import from_pretrained, model_registry, save_pretrained
    from torchtitan_nemotron3.train.toml_config import ConfigError, load_job

    def mamba_backends(model_config) -> set[str]:
        return {b.mixer.kernel_backend for b in model_config.layers if b.layer_type == MAMBA}

    assert mamba_backends(model_registry("debugmodel", kernel_backend="torch").model) == {
        "torch"
    }
    job = tmp_path / "job.toml"
    job.write_text('kernel_backend = "cuda"\n[job]\nconfig = "nemotron3_debugmodel"\n')
    config, _ = load_job(str(job), [])
    assert mamba_backends(config.model_spec.model) == {"cuda"}
    config, _ = load_job(str(job), ["--kernel_backend", "torch"])
    assert mamba_backends(config.model_spec.model) == {"torch"}
    with pytest.raises(ConfigError, match="kernel_backend"):
        load_job(str(job), ["--kernel_backend", "triton"])

    save_pretrained(build(mamba_args()), tmp_path / "hf")
    model = from_pretrained(tmp_path / "hf", kernel_backend="torch")
    assert {type(m.ops) for m in model.modules() if hasattr(m, "ops")} == {TorchMambaOps}
