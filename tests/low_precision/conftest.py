import pytest
import torch


@pytest.fixture(autouse=True)
def _restore_inductor_precision_casts():
    """The rowwise converters set this inductor flag process-wide (as TorchTitan's)."""
    saved = torch._inductor.config.emulate_precision_casts
    yield
    torch._inductor.config.emulate_precision_casts = saved
