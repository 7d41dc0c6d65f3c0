"""The job's ``[low_precision]`` section: what runs in FP8 / MXFP8, applied once to
the model's config tree, and the combinations refused until measured on a GPU."""

import warnings
from dataclasses import dataclass, field
from importlib.util import find_spec
from typing import Literal

from torchtitan.tools.utils import has_cuda_capability

from .patterns import anchored

# Module FQNs (anchored regexes) that stay exact by default. The router gate is
# not listed: it is an fp32 ``Float32Linear`` and never converted (by type).
DEFAULT_KEEP_BF16: tuple[str, ...] = (
    r"lm_head",  # output projection: the most sensitive GEMM (TorchTitan's recipes keep it)
    r".*\.in_proj\.dt",  # Mamba's dt part: N = heads (64 on Nano), not worth it
    r".*\.fc[12]_latent_proj",  # Super/Ultra latent projections (NVIDIA keeps them)
    r"mtp\..*",  # the MTP block (NVIDIA's keep_mtp_spec_in_bf16)
)


@dataclass(kw_only=True, slots=True)
class LowPrecisionConfig:
    """FP8 rowwise (H100) / MXFP8 (B200) GEMMs for the dense Linear layers and the
    routed experts; communication and parameters stay bf16/fp32."""

    linear: Literal["bf16", "float8_rowwise", "float8_rowwise_gw_hp", "mxfp8"] = "bf16"
    """Dense Linear layers (Mamba in/out projections, attention, MLP, shared expert)."""

    experts: Literal["bf16", "float8_rowwise", "mxfp8"] = "bf16"
    """The routed experts' two grouped GEMMs."""

    emulate: bool = False
    """Run torchao's emulated MXFP8 kernels and our FP8 grouped-GEMM emulation (any
    device, slow: for CPU tests). FP8 rowwise Linears need none (CPU has the op)."""

    keep_bf16: list[str] = field(default_factory=lambda: list(DEFAULT_KEEP_BF16))
    """Module FQNs that stay exact, as regexes matching the whole name
    (``layers\\.3\\.mixer\\.q_proj`` does not match ``mtp.layers.3.mixer.q_proj``).
    Leave ``mtp\\..*`` out to convert the MTP block."""

    expert_pad_multiple: int | None = None
    """Expert token groups padded to this many rows; None: 16 (FP8), 128 (MXFP8 on
    SM100), 32 (MXFP8 emulated)."""

    def __post_init__(self):
        for name, choices in (
            ("linear", ("bf16", "float8_rowwise", "float8_rowwise_gw_hp", "mxfp8")),
            ("experts", ("bf16", "float8_rowwise", "mxfp8")),
        ):
            if getattr(self, name) not in choices:
                raise ValueError(
                    f"low_precision.{name}={getattr(self, name)!r}: choose from {list(choices)}"
                )
        anchored(self.keep_bf16)
        pad = self.expert_pad_multiple
        if pad is not None and pad <= 0:
            raise ValueError(f"low_precision.expert_pad_multiple={pad}: must be positive")

    @property
    def enabled(self) -> bool:
        return self.linear != "bf16" or self.experts != "bf16"

    def converters(self, model_compile_enabled: bool = False) -> list:
        """The converter configs this section stands for (for ``model_registry``)."""
        from .experts_converter import NemotronHGroupedExpertsConverter
        from .linear import NemotronHLinearConverter

        out = []
        if self.linear != "bf16":
            out.append(
                NemotronHLinearConverter.Config(
                    recipe=self.linear,
                    emulate=self.emulate,
                    keep_bf16=list(self.keep_bf16),
                    model_compile_enabled=model_compile_enabled,
                )
            )
        if self.experts != "bf16":
            out.append(
                NemotronHGroupedExpertsConverter.Config(
                    recipe=self.experts,
                    emulate=self.emulate,
                    keep_bf16=list(self.keep_bf16),
                    pad_multiple=self.expert_pad_multiple,
                    model_compile_enabled=model_compile_enabled,
                )
            )
        return out


def apply(model_config, lp: LowPrecisionConfig, *, model_compile_enabled: bool = False):
    """Convert ``model_config`` in place as ``lp`` says. What an earlier call
    converted is reverted first, so the last settings win (TorchTitan builds the
    job's config more than once around the same model config)."""
    if find_spec("torchao") is None:
        if lp.enabled:
            raise ImportError(
                f"low_precision (linear={lp.linear!r}, experts={lp.experts!r}) needs "
                "torchao: pip install -e '.[fp8]'"
            )
        return model_config  # nothing of ours can be in the tree without torchao
    from . import experts_converter, linear

    linear.revert(model_config)
    experts_converter.revert(model_config)
    for c in lp.converters(model_compile_enabled):
        model_config = c.build().convert(model_config)
    return model_config


def check_combination(
    lp: LowPrecisionConfig, *, tensor_parallel_degree: int, ac_enabled: bool, model_compiled: bool
) -> None:
    """Config-time guards, by upstream issue, until these are measured on a GPU."""
    if lp.linear != "bf16" and tensor_parallel_degree > 1:
        raise ValueError(
            f"low_precision.linear={lp.linear!r} with parallelism.tensor_parallel_degree="
            f"{tensor_parallel_degree}: refused (pytorch #191992: MXFP8Linear output "
            "placements under TP; torchtitan #3109: FP8 + TP NaN from step 3); use TP=1 "
            "or linear='bf16'"
        )
    if lp.experts == "mxfp8" and ac_enabled and model_compiled:
        warnings.warn(
            "low_precision.experts='mxfp8' with activation checkpointing and a compiled "
            "model: torchtitan #1971 (CheckpointError: trying to save more tensors during "
            "recomputation) is open; set activation_checkpoint none if it appears",
            stacklevel=2,
        )


def check_hardware(lp: LowPrecisionConfig) -> None:
    """At trainer start (not config time: a login node configures B200 jobs): the
    real kernels need their GPU generation; ``emulate`` runs anywhere."""
    if not lp.enabled or lp.emulate:
        return
    wants_mx = "mxfp8" in (lp.linear, lp.experts)
    if wants_mx and not has_cuda_capability(10, 0):
        raise ValueError(
            "low_precision 'mxfp8' needs an SM100 GPU (B200/GB200) and none is visible; "
            "set low_precision.emulate = true for torchao's emulated kernels (slow; tests)"
        )
    if not has_cuda_capability(8, 9) and not wants_mx:
        raise ValueError(
            "low_precision 'float8_rowwise' needs an SM89+ GPU (H100/B200) and none is "
            "visible; set low_precision.emulate = true to run it on this device (tests)"
        )
