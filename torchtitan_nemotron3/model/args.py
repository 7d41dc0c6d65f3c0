"""NemotronH hyperparameters, flat and named as in the Hugging Face ``config.json``.

One flat record is what a flavor, a ``config.json`` and a user override have in
common; ``flavors.build_model_config`` turns it into TorchTitan's nested module
configs. Field names are transformers' so the HF mapping is the identity.
"""

import dataclasses
import math
from dataclasses import dataclass

from .pattern import ATTENTION, MAMBA, MLP, MOE, parse_hybrid_pattern, pipeline_segments


@dataclass(kw_only=True)
class NemotronHArgs:
    vocab_size: int
    hidden_size: int
    hybrid_override_pattern: str
    num_hidden_layers: int | None = None  # defaults to len(pattern); checked if given
    layer_norm_epsilon: float = 1e-5
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    rescale_prenorm_residual: bool = True
    # attention (*)
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int = 128
    attention_bias: bool = False
    # Mamba2 (M)
    mamba_num_heads: int = 64
    mamba_head_dim: int = 64
    ssm_state_size: int = 128
    n_groups: int = 8
    conv_kernel: int = 4
    use_conv_bias: bool = True
    use_bias: bool = False
    chunk_size: int = 128
    time_step_min: float = 1e-3
    time_step_max: float = 0.1
    time_step_floor: float = 1e-4
    time_step_limit: tuple[float, float] = (0.0, math.inf)
    mamba_hidden_act: str = "silu"
    # dense MLP (-) and experts
    intermediate_size: int = 1856
    mlp_bias: bool = False
    mlp_hidden_act: str = "relu2"
    # MoE (E)
    n_routed_experts: int = 128
    num_experts_per_tok: int = 6
    n_shared_experts: int = 1
    moe_intermediate_size: int = 1856
    moe_shared_expert_intermediate_size: int = 3712
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 2.5
    load_balance_coeff: float | None = 1e-3  # aux-loss-free bias update rate
    # Ours, not in config.json: NVIDIA's sequence-level balance loss (NVIDIA
    # trains with 1e-4); 0 is off.
    moe_seq_aux_loss_coeff: float = 0.0
    # Latent MoE (Super, Ultra): routed experts work in this width, between
    # fc1_latent_proj (hidden → latent) and fc2_latent_proj (latent → hidden).
    moe_latent_size: int | None = None
    # Multi-token prediction (Super, Ultra): the checkpoint stores
    # ``num_nextn_predict_layers`` MTP blocks (0 or 1 here), each of the layers in
    # ``mtp_hybrid_override_pattern`` ("*E": attention, then MoE).
    num_nextn_predict_layers: int = 0
    mtp_hybrid_override_pattern: str = "*E"
    # Ours (job file), not in config.json: the depths D the stored block is
    # applied for in training (0: MTP off, its parameters are not built), and λ in
    # L_main + λ/D · Σ_k CE_k.
    mtp_num_layers: int = 0
    mtp_loss_scaling_factor: float = 0.3
    # Layers per pipeline stage, from the ``|`` of a Megatron pattern (which
    # ``hybrid_override_pattern`` itself drops); ours only, not in config.json.
    pipeline_segments: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        raw_pattern = self.hybrid_override_pattern
        self.hybrid_override_pattern = parse_hybrid_pattern(
            raw_pattern, self.num_hidden_layers
        )
        if self.pipeline_segments is None:
            self.pipeline_segments = pipeline_segments(raw_pattern)
        else:
            self.pipeline_segments = tuple(int(n) for n in self.pipeline_segments)
        self.num_hidden_layers = len(self.hybrid_override_pattern)
        self.mtp_hybrid_override_pattern = parse_hybrid_pattern(
            self.mtp_hybrid_override_pattern
        )
        self.time_step_limit = tuple(float(v) for v in self.time_step_limit)
        self.validate()

    @property
    def mamba_d_inner(self) -> int:
        return self.mamba_num_heads * self.mamba_head_dim

    def replace(self, **changes) -> "NemotronHArgs":
        # A new pattern brings its own stage boundaries (or none).
        if "hybrid_override_pattern" in changes:
            changes.setdefault("pipeline_segments", None)
        return dataclasses.replace(self, **changes)

    def validate(self) -> None:
        """Reject, by name, every value the model cannot honour."""

        def bad(field: str, why: str) -> ValueError:
            return ValueError(f"{field}={getattr(self, field)!r}: {why}")

        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, int) and not isinstance(value, bool) and value < 0:
                raise bad(field.name, "must not be negative")
        for field in ("vocab_size", "hidden_size"):
            if getattr(self, field) <= 0:
                raise bad(field, "must be positive")
        if self.tie_word_embeddings:
            raise bad("tie_word_embeddings", "NemotronH has an untied lm_head")
        if self.moe_latent_size is not None and self.moe_latent_size <= 0:
            raise bad("moe_latent_size", "must be positive (None: no latent MoE)")
        if self.num_nextn_predict_layers not in (0, 1):
            raise bad(
                "num_nextn_predict_layers",
                "only one stored MTP block (applied mtp_num_layers times) is implemented",
            )
        if self.mtp_num_layers and not self.num_nextn_predict_layers:
            raise bad(
                "mtp_num_layers",
                "MTP needs num_nextn_predict_layers=1 (the stored block it repeats)",
            )
        if not self.moe_seq_aux_loss_coeff >= 0.0:
            raise bad("moe_seq_aux_loss_coeff", "must be >= 0")
        if not self.mtp_loss_scaling_factor >= 0.0:
            raise bad("mtp_loss_scaling_factor", "must be >= 0")
        if self.mamba_hidden_act != "silu":
            raise bad("mamba_hidden_act", "only 'silu' is implemented")
        if self.mlp_hidden_act != "relu2":
            raise bad("mlp_hidden_act", "only 'relu2' is implemented")
        lo, hi = self.time_step_limit
        if not 0.0 <= lo < hi:
            raise bad("time_step_limit", "needs 0 <= low < high")
        segments = self.pipeline_segments
        if segments is not None and (
            any(n < 0 for n in segments) or sum(segments) != self.num_hidden_layers
        ):
            raise bad(
                "pipeline_segments",
                f"needs non-negative layer counts summing to the "
                f"{self.num_hidden_layers} layers of the pattern",
            )

        kinds = set(self.hybrid_override_pattern)
        if self.num_nextn_predict_layers:
            kinds |= set(self.mtp_hybrid_override_pattern)
        if ATTENTION in kinds:
            if self.num_attention_heads <= 0 or self.head_dim <= 0:
                raise bad("num_attention_heads", "attention needs heads and head_dim > 0")
            if self.num_key_value_heads <= 0 or (
                self.num_attention_heads % self.num_key_value_heads
            ):
                raise bad(
                    "num_key_value_heads",
                    f"must divide num_attention_heads={self.num_attention_heads}",
                )
            if self.attention_bias:
                raise bad("attention_bias", "NemotronH attention has no bias")
        if MAMBA in kinds:
            for field in ("mamba_num_heads", "mamba_head_dim", "ssm_state_size",
                          "n_groups", "conv_kernel", "chunk_size"):
                if getattr(self, field) <= 0:
                    raise bad(field, "must be positive")
            if self.mamba_num_heads % self.n_groups:
                raise bad("n_groups", f"must divide mamba_num_heads={self.mamba_num_heads}")
        if MLP in kinds and self.intermediate_size <= 0:
            raise bad("intermediate_size", "must be positive for '-' layers")
        if MOE in kinds:
            if self.n_routed_experts <= 0 or self.moe_intermediate_size <= 0:
                raise bad("n_routed_experts", "MoE layers need experts of positive width")
            if not 0 < self.num_experts_per_tok <= self.n_routed_experts:
                raise bad(
                    "num_experts_per_tok",
                    f"must be in [1, n_routed_experts={self.n_routed_experts}]",
                )
            if self.n_shared_experts != 1:
                raise bad("n_shared_experts", "NemotronH has exactly one shared expert")
            if self.n_group <= 0 or self.n_routed_experts % self.n_group:
                raise bad("n_group", f"must divide n_routed_experts={self.n_routed_experts}")
            if self.n_group > 1:
                if self.n_routed_experts // self.n_group < 2:
                    raise bad("n_group", "group-limited routing needs >= 2 experts per group")
                if not 0 < self.topk_group <= self.n_group:
                    raise bad("topk_group", f"must be in [1, n_group={self.n_group}]")
                if self.num_experts_per_tok > self.topk_group * (
                    self.n_routed_experts // self.n_group
                ):
                    raise bad(
                        "num_experts_per_tok",
                        "exceeds the experts reachable in topk_group groups",
                    )
