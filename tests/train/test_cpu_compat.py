"""cpu_compat: each shim applies only where needed, and applying twice is a no-op."""

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


def test_set_timeout_shim_noop_when_present(monkeypatch):
    monkeypatch.setattr(dist, "set_timeout", lambda *a, **k: None, raising=False)
    assert cpu_compat._shim_set_timeout() is False


def test_device_shim_noop_with_accelerator(monkeypatch):
    monkeypatch.setattr(cpu_compat, "_no_accelerator", lambda: False)
    assert cpu_compat._shim_cpu_device() is False
    assert cpu_compat._shim_flush_denormal() is False


def test_denormals_flushed_on_cpu():
    cpu_compat.apply()
    tiny = torch.tensor([1e-39], dtype=torch.float32)  # a denormal
    if torch.cuda.is_available():
        assert "flush_denormal" not in cpu_compat.applied()
    else:
        assert "flush_denormal" in cpu_compat.applied()
        assert tiny.item() == 0.0


def test_adjust_config_noop_with_accelerator(monkeypatch):
    monkeypatch.setattr(cpu_compat, "_no_accelerator", lambda: True)
    config = Trainer.Config()
    monkeypatch.setattr(cpu_compat, "_no_accelerator", lambda: False)
    assert cpu_compat.adjust_config_for_cpu(config, world_size=2) == []
    assert config.training.disable_cuda_graphs is False
    assert config.parallelism.spmd_backend == "spmd_types"


def _spec_config():
    from torchtitan.protocols.model_spec import ModelSpec

    def parallelize(model, **kwargs):
        return model

    spec = ModelSpec(
        name="toy",
        flavor="toy",
        model=None,
        parallelize_fn=parallelize,
        pipelining_fn=None,
        post_optimizer_build_fn=None,
        state_dict_adapter=None,
    )
    return Trainer.Config(model_spec=spec), parallelize


def test_adjust_config_single_rank(monkeypatch):
    monkeypatch.setattr(cpu_compat, "_no_accelerator", lambda: True)
    config, parallelize = _spec_config()
    changes = cpu_compat.adjust_config_for_cpu(config, world_size=1)
    assert changes == ["training.disable_cuda_graphs=True"]
    assert config.parallelism.spmd_backend == "spmd_types"  # fine with 1 rank
    assert config.model_spec.parallelize_fn is parallelize


def test_adjust_config_two_ranks_idempotent(monkeypatch):
    monkeypatch.setattr(cpu_compat, "_no_accelerator", lambda: True)
    config, parallelize = _spec_config()
    changes = cpu_compat.adjust_config_for_cpu(config, world_size=2)
    assert len(changes) == 3
    assert config.parallelism.spmd_backend == "partial_dtensor"
    wrapped = config.model_spec.parallelize_fn
    assert wrapped is not parallelize and wrapped.__wrapped__ is parallelize
    model = torch.nn.Linear(2, 2)
    assert wrapped(model) is model  # no FSDP modules: nothing to change

    assert cpu_compat.adjust_config_for_cpu(config, world_size=2) == []
    assert config.model_spec.parallelize_fn is wrapped


def test_explicit_backend_kept(monkeypatch):
    monkeypatch.setattr(cpu_compat, "_no_accelerator", lambda: True)
    config, _ = _spec_config()
    config.parallelism.spmd_backend = "full_dtensor"
    cpu_compat.adjust_config_for_cpu(config, world_size=2)
    assert config.parallelism.spmd_backend == "full_dtensor"
