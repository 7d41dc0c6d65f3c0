"""Dense FP8 / MXFP8 peak FLOP/s, so a low-precision run's MFU is measured against
the peak its GEMMs can reach (TorchTitan reports no MFU under quantization).
The FLOP count is unchanged: the same GEMMs, in fewer bits."""

# Dense (no sparsity) FP8 tensor-core peaks from NVIDIA's datasheets; MXFP8 runs at
# the FP8 rate on Blackwell. Checked in order: "GB200" contains "B200".
_FP8_PEAKS = (
    ("GB300", 5.0e15),
    ("GB200", 5.0e15),
    ("B300", 4.5e15),
    ("B200", 4.5e15),
    ("H100 NVL", 1671e12),
    ("H100 PCIe", 1513e12),
    ("H100", 1979e12),  # SXM
    ("H200", 1979e12),
)


def fp8_peak_flops(device_name: str) -> float | None:
    """The device's dense FP8 peak, or None when not known (MFU is then not logged)."""
    for key, peak in _FP8_PEAKS:
        if key in device_name:
            return peak
    return None


def use_fp8_peak(metrics_processor) -> float | None:
    """Make TorchTitan's ``MetricsProcessor`` log MFU against the FP8 peak."""
    peak = fp8_peak_flops(metrics_processor.device_memory_monitor.device_name)
    if peak is not None:
        metrics_processor.gpu_peak_flops = peak
        metrics_processor.has_quantization = False
    return peak
