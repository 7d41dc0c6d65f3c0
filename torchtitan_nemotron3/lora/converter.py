"""LoRA for NemotronH through TorchTitan's own ``LoRAConverter``.

TorchTitan's converter swaps each target ``Linear.Config`` for a ``LoRALinear``
config (frozen base, trainable ``lora_a`` [r, in] / ``lora_b`` [out, r], B = 0 at
init, output ``W x + alpha/r · B A x``) and freezes every other module. It matches
targets by the *last* segment of the config FQN only, so the names below were
checked against the debug and Nano config trees (``tests/lora/test_targets.py``).

What this subclass adds: NemotronH's default targets, a refusal of targets that
match nothing (the transformers-path failure the issue cites: a LoRA config naming
``gate_proj`` silently trained nothing in the Mamba layers) and of the routed
experts (grouped 3-D weights: not implemented, and vLLM cannot serve them).
"""

from dataclasses import dataclass, field

from torchtitan.components.lora import LoRAConverter
from torchtitan.models.common.linear import Linear
from torchtitan.protocols.module import Module
from torchtitan.tools.logging import logger

# Last FQN segment → the Linear configs it matches in NemotronH's tree (only these
# hold Linear configs under these names; the conv parts ``conv1d.x/B/C`` are
# Conv1d configs, so "x", "B", "C" match the in_proj parts only):
#   z, x, B, C, dt   layers.{M}.mixer.in_proj.{part}   (Mamba2 input projection)
#   out_proj         layers.{M}.mixer.out_proj
#   q/k/v/o_proj     layers.{*}.mixer.{q,k,v,o}_proj   (attention)
#   up/down_proj     layers.{-}.mixer.{up,down}_proj   (dense MLP) and
#                    layers.{E}.mixer.shared_experts.{up,down}_proj (shared expert)
# Not matched by default: lm_head, the router gate ("gate"; fp32, decides routing).
DEFAULT_TARGET_MODULES: tuple[str, ...] = (
    "z", "x", "B", "C", "dt", "out_proj",
    "q_proj", "k_proj", "v_proj", "o_proj",
    "up_proj", "down_proj",
)  # fmt: skip

# The default minus Mamba's out_proj: PEFT (0.21) refuses LoRA on ``out_proj`` /
# ``conv1d`` of Mamba models (transformers' CUDA path reads ``out_proj.weight``
# directly, bypassing adapters), so train with these when the adapters themselves
# must load with PEFT; the merged export serves either.
PEFT_TARGET_MODULES: tuple[str, ...] = tuple(
    t for t in DEFAULT_TARGET_MODULES if t != "out_proj"
)

# Names that would mean the routed experts (3-D grouped weights, not Linear configs).
ROUTED_EXPERT_NAMES = frozenset(
    {"experts", "routed_experts", "inner_experts", "w1_EFD", "w2_EDF"}
)


class NemotronHLoRAConverter(LoRAConverter):
    """``LoRAConverter`` with NemotronH's targets and checks (see the module doc)."""

    @dataclass(kw_only=True, slots=True)
    class Config(LoRAConverter.Config):
        target_modules: list[str] | None = field(
            default_factory=lambda: list(DEFAULT_TARGET_MODULES)
        )
        """Last FQN segments to adapt (``DEFAULT_TARGET_MODULES``); None: every
        Linear (lm_head and the router gate included)."""

        routed_experts: bool = False
        """LoRA on the routed experts: not implemented (refused when True)."""

        def __post_init__(self):
            asked = set(self.target_modules or ()) & ROUTED_EXPERT_NAMES
            if self.routed_experts or asked:
                raise NotImplementedError(
                    "LoRA on NemotronH's routed experts (grouped 3-D weights "
                    f"w1_EFD/w2_EDF{'; asked via ' + str(sorted(asked)) if asked else ''})"
                    " is not implemented (and vLLM cannot serve LoRA on MoE experts): "
                    "leave routed_experts=False; the shared expert's up_proj/down_proj "
                    "are adapted by default"
                )

    def convert(self, model_config: Module.Config) -> Module.Config:
        """TorchTitan's conversion, after refusing target names that match no
        Linear config of this model (a silent no-op otherwise)."""
        if self.target_modules is not None:
            present = {
                fqn.rsplit(".", 1)[-1]
                for fqn, cfg, _, _ in model_config.traverse(Module.Config, recurse=True)
                if isinstance(cfg, Linear.Config)
            }
            unknown = sorted(self.target_modules - present)
            if unknown:
                raise ValueError(
                    f"LoRA target_modules {unknown} match no Linear in NemotronH "
                    f"(its Linear names: {sorted(present)}); the defaults are "
                    f"{list(DEFAULT_TARGET_MODULES)}"
                )
        converted = super().convert(model_config)
        n = sum(1 for _ in adapted_fqns(converted))
        logger.info(
            f"LoRA: {n} Linear layers adapted (rank {self.rank}, alpha {self.alpha})"
        )
        return converted


def is_lora_config(cfg) -> bool:
    """A ``LoRALinear`` config (TorchTitan builds the class per base Linear type)."""
    return (
        isinstance(cfg, Linear.Config)
        and hasattr(cfg, "rank")
        and hasattr(cfg, "alpha")
    )


def adapted_fqns(model_config: Module.Config):
    """(module FQN, LoRA config) of every adapted Linear in a converted tree."""
    for fqn, cfg, _, _ in model_config.traverse(Module.Config, recurse=True):
        if is_lora_config(cfg):
            yield fqn, cfg


def lora_scalings(model_config) -> dict[str, float]:
    """``{module FQN: alpha / rank}`` of every adapted Linear (empty without LoRA)."""
    return {fqn: cfg.alpha / cfg.rank for fqn, cfg in adapted_fqns(model_config)}
