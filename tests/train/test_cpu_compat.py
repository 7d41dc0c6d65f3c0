"""cpu_compat on this machine: what it changes is what TorchTitan needs here, once."""

import torch
import torch.distributed as dist
from torchtitan.trainer import Trainer

from torchtitan_nemotron3.train import cpu_compat


def test_apply_is_idempotent():
    from torchtitan.tools import utils

    first = cpu_compat.apply()
    state = (utils.device_type, utils.device_module, getattr(dist, "set_timeout", None))
    assert cpu_compat.apply() == first
    assert (
        utils.device_type,
        utils.device_module,
        getattr(dist, "set_timeout", None),
    ) == state


def test_apply_matches_this_machine():
    from torchtitan.tools import utils

    applied = cpu_compat.apply()
    if torch.cuda.is_available():
        assert "cpu_device" not in applied
        assert utils.device_type == "cuda"
    else:
        assert "cpu_device" in applied
        assert utils.device_type == "cpu"
        # modules that imported the names before apply() see the CPU ones too
        from torchtitan.components import metrics
        from torchtitan.distributed import utils as dist_utils

        assert metrics.device_type == dist_utils.device_type == "cpu"
        assert metrics.device_module is utils.device_module
    assert hasattr(dist, "set_timeout")


def test_cpu_device_module_covers_torchtitan_calls():
    mod = cpu_compat._CpuDeviceModule()
    assert isinstance(mod.get_device_name(), str)
    assert mod.current_device() == 0  # an int: dist.barrier(device_ids=[...])
    assert mod.get_device_properties(torch.device("cpu")).total_memory > 0
    stats = mod.memory_stats(torch.device("cpu"))
    assert stats["reserved_bytes.all.peak"] > 0 and stats["num_ooms"] == 0
    mod.reset_peak_memory_stats()
    mod.empty_cache()
    mod.synchronize()  # delegated to torch.cpu
    assert mod.device_count() == torch.cpu.device_count()


def test_denormals_flushed_on_cpu():
    cpu_compat.apply()
    tiny = torch.tensor([1e-39], dtype=torch.float32)  # a denormal
    if torch.cuda.is_available():
        assert "flush_denormal" not in cpu_compat.applied()
    else:
        assert "flush_denormal" in cpu_compat.applied()
        assert tiny.item() == 0.0


def test_adjust_config_on_this_machine():
    """On CPU the config is made runnable on gloo ranks; with a GPU nothing changes."""
    config = Trainer.Config()
    changes = cpu_compat.adjust_config_for_cpu(config, world_size=2)
    if torch.cuda.is_available():
        assert changes == []
    else:
        assert config.training.disable_cuda_graphs
        assert config.parallelism.spmd_backend == "partial_dtensor"
        assert cpu_compat.adjust_config_for_cpu(config, world_size=2) == []
