"""The [low_precision] section through the job-file path users run (TorchTitan's
parser builds the config around the same model config more than once), the
guards there, and the MFU peak."""

from types import SimpleNamespace

import pytest
from torchtitan.components.quantization.float8 import Float8Linear
from torchtitan.components.quantization.mx import MXFP8Linear
from torchtitan.models.common.linear import Linear
from torchtitan.models.common.token_dispatcher import TorchAOTokenDispatcher

from torchtitan_nemotron3.low_precision import fp8_peak_flops, use_fp8_peak
from torchtitan_nemotron3.model.moe import ReluSquaredGroupedExperts
from torchtitan_nemotron3.train.toml_config import ConfigError, load_job

NANO_MXFP8 = "train_configs/nemotron3-nano-30B-mxfp8.toml"


def _count(model, cls) -> int:
    return sum(isinstance(c, cls.Config) for _, c, _, _ in model.traverse(Linear.Config))


def _experts(model):
    return [
        (type(c), parent.token_dispatcher)
        for _, c, parent, _ in model.traverse(ReluSquaredGroupedExperts.Config)
    ]


def test_nano_mxfp8_job_converts_185_linears_and_pads_experts_to_128():
    config, _ = load_job(NANO_MXFP8, [])
    model = config.model_spec.model
    assert _count(model, MXFP8Linear) == 185
    experts = _experts(model)
    assert len(experts) == 23
    assert all(
        isinstance(d, TorchAOTokenDispatcher.Config) and d.pad_multiple == 128
        for _, d in experts
    )


def test_command_line_overrides_the_config_functions_settings():
    """The emulated config function converts; the command line's settings win,
    and what they turn off is plain again."""
    argv = ["--low_precision.linear", "float8_rowwise", "--low_precision.experts", "bf16"]
    config, _ = load_job(None, ["--config", "nemotron3_debugmodel_mxfp8_emulated", *argv])
    model = config.model_spec.model
    assert _count(model, MXFP8Linear) == 0 and _count(model, Float8Linear) == 57
    assert all(cls is ReluSquaredGroupedExperts.Config for cls, _ in _experts(model))
    assert all(not isinstance(d, TorchAOTokenDispatcher.Config) for _, d in _experts(model))


def test_tensor_parallel_is_refused_at_config_time():
    with pytest.raises(ConfigError, match=r"tensor_parallel_degree=2: refused \(pytorch #191992"):
        load_job(NANO_MXFP8, ["--parallelism.tensor_parallel_degree", "2"])


def test_mfu_is_against_the_fp8_peak():
    assert fp8_peak_flops("NVIDIA B200") == 4.5e15
    assert fp8_peak_flops("NVIDIA H100 80GB HBM3") == 1979e12
    assert fp8_peak_flops("NVIDIA GB200") == 5.0e15
    assert fp8_peak_flops("cpu") is None
    metrics = SimpleNamespace(
        device_memory_monitor=SimpleNamespace(device_name="NVIDIA B200"),
        gpu_peak_flops=2.25e15,  # TorchTitan's BF16 peak
        has_quantization=True,  # TorchTitan's "no MFU" under quantization
    )
    assert use_fp8_peak(metrics) == 4.5e15
    assert metrics.gpu_peak_flops == 4.5e15 and not metrics.has_quantization
    unknown = SimpleNamespace(
        device_memory_monitor=SimpleNamespace(device_name="cpu"),
        gpu_peak_flops=312e12,
        has_quantization=True,
    )
    assert use_fp8_peak(unknown) is None and unknown.has_quantization  # MFU stays N/A


def test_the_trainer_refuses_real_kernels_without_their_gpu():
    """Checked at trainer start, not config time (a login node configures B200 jobs)."""
    import torch

    from torchtitan_nemotron3.low_precision import LowPrecisionConfig, check_hardware

    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    with pytest.raises(ValueError, match=r"'mxfp8' needs an SM100 GPU .*emulate = true"):
        check_hardware(LowPrecisionConfig(linear="float8_rowwise", experts="mxfp8"))
    with pytest.raises(ValueError, match=r"'float8_rowwise' needs an SM89\+ GPU"):
        check_hardware(LowPrecisionConfig(linear="float8_rowwise"))
    check_hardware(LowPrecisionConfig(linear="mxfp8", experts="mxfp8", emulate=True))
    check_hardware(LowPrecisionConfig())


def test_the_flop_count_is_unchanged():
    """MFU's numerator: the same GEMMs, in fewer bits."""
    import torch

    from torchtitan_nemotron3 import model_registry
    from torchtitan_nemotron3.low_precision import LowPrecisionConfig, apply
    from torchtitan_nemotron3.model.flops import nparams_and_flops

    counts = []
    for lp in (LowPrecisionConfig(), LowPrecisionConfig(linear="mxfp8", experts="mxfp8")):
        cfg = apply(model_registry("debugmodel").model, lp)
        with torch.device("meta"):
            counts.append(nparams_and_flops(cfg, cfg.build(), seq_len=256))
    assert counts[0] == counts[1] and counts[0][1] > 0


def test_h100_job_fits_80gb_as_its_comment_says(capsys):
    from torchtitan_nemotron3.dry_run import main

    toml = "train_configs/nemotron3-nano-30B-float8.toml"
    assert main(["--config", toml, "--ngpu", "16", "--gpu_gib", "80"]) == 0
    verdict = capsys.readouterr().out.strip().splitlines()[-1]
    assert verdict.startswith("verdict: fits in 80 GiB per GPU: 62.9 GiB"), verdict
    with open(toml) as f:
        assert "62.9 GiB per GPU" in f.read()


def test_float8_emulated_debug_config_function_converts():
    """The H100 recipe's debug config function: 57 FP8 rowwise Linears (as the
    MXFP8 one converts 57 MXFP8 ones) and quantized experts on every MoE layer."""
    config, _ = load_job(None, ["--config", "nemotron3_debugmodel_float8_emulated"])
    model = config.model_spec.model
    assert _count(model, Float8Linear) == 57 and _count(model, MXFP8Linear) == 0
    experts = _experts(model)
    assert experts and all(cls is not ReluSquaredGroupedExperts.Config for cls, _ in experts)
    assert config.low_precision.linear == config.low_precision.experts == "float8_rowwise"
