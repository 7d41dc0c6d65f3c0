"""Which layers the [low_precision] section converts, on the config trees of every
flavor (no model is built): the intended list, written here from the hybrid
pattern, against what the converters produce."""

import warnings

import pytest
from torchtitan.components.quantization import Float8LinearConverter
from torchtitan.components.quantization.float8 import Float8Linear
from torchtitan.components.quantization.mx import MXFP8Linear
from torchtitan.components.quantization.utils import has_quantization, module_filter_fn
from torchtitan.models.common.linear import Linear
from torchtitan.models.common.token_dispatcher import TorchAOTokenDispatcher

from torchtitan_nemotron3 import model_registry
from torchtitan_nemotron3.low_precision import LowPrecisionConfig, apply, check_combination
from torchtitan_nemotron3.low_precision.experts import (
    Float8RowwiseReluSquaredGroupedExperts,
    mxfp8_experts_cls,
)
from torchtitan_nemotron3.model import flavor_args
from torchtitan_nemotron3.model.moe import ReluSquaredGroupedExperts
from torchtitan_nemotron3.model.router import Float32Linear

MIXER_LINEARS = {
    "M": ["in_proj.z", "in_proj.x", "in_proj.B", "in_proj.C", "out_proj"],
    "*": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "-": ["up_proj", "down_proj"],
    "E": ["shared_experts.up_proj", "shared_experts.down_proj"],
}


def intended(flavor: str, mtp: bool = False) -> tuple[set[str], set[str]]:
    """(converted Linear FQNs, converted expert FQNs) by default: every mixer Linear
    but Mamba's dt, the router gate and the latent projections; no lm_head; the MTP
    block only when asked."""
    args = flavor_args(flavor)
    linears, experts = set(), set()
    blocks = [(f"layers.{i}", s) for i, s in enumerate(args.hybrid_override_pattern)]
    if mtp and args.mtp_num_layers:
        blocks += [
            (f"mtp.layers.{i}", s) for i, s in enumerate(args.mtp_hybrid_override_pattern)
        ]
    for prefix, symbol in blocks:
        linears |= {f"{prefix}.mixer.{name}" for name in MIXER_LINEARS[symbol]}
        if symbol == "E":
            experts.add(f"{prefix}.mixer.routed_experts.inner_experts")
    if mtp and args.mtp_num_layers:
        linears.add("mtp.layers.0.eh_proj")
    return linears, experts


def converted(model_config) -> tuple[set[str], set[str]]:
    linears = {
        fqn
        for fqn, cfg, _, _ in model_config.traverse(Linear.Config)
        if isinstance(cfg, (Float8Linear.Config, MXFP8Linear.Config))
    }
    experts = {
        fqn
        for fqn, cfg, _, _ in model_config.traverse(ReluSquaredGroupedExperts.Config)
        if type(cfg) is not ReluSquaredGroupedExperts.Config
    }
    return linears, experts


def gates(model_config):
    return [
        cfg for fqn, cfg, _, _ in model_config.traverse(Linear.Config)
        if fqn.endswith("router.gate")
    ]  # fmt: skip


@pytest.mark.parametrize(
    "flavor,n_linear,n_total",
    [("debugmodel", 57, 70), ("nano-30B", 185, 232), ("super-120B", 312, 483),
     ("ultra-550B", 384, 587)],
)  # fmt: skip
@pytest.mark.parametrize("recipe", ["mxfp8", "float8_rowwise"])
def test_conversion_map_is_the_intended_one(flavor, n_linear, n_total, recipe):
    model = model_registry(flavor).model
    assert sum(1 for _ in model.traverse(Linear.Config)) == n_total
    model = apply(model, LowPrecisionConfig(linear=recipe, experts=recipe, emulate=True))
    linears, experts = converted(model)
    want_linears, want_experts = intended(flavor)
    assert linears == want_linears and len(linears) == n_linear
    assert experts == want_experts
    assert gates(model) and all(type(g) is Float32Linear.Config for g in gates(model))
    lm_head = [c for f, c, _, _ in model.traverse(Linear.Config) if f == "lm_head"]
    assert type(lm_head[0]) is Linear.Config
    assert has_quantization(model)
    for fqn, cfg, parent, _ in model.traverse(ReluSquaredGroupedExperts.Config):
        dispatcher = parent.token_dispatcher
        if fqn in want_experts:
            assert isinstance(dispatcher, TorchAOTokenDispatcher.Config), fqn
            assert dispatcher.pad_multiple == (32 if recipe == "mxfp8" else 16)
            cls = mxfp8_experts_cls() if recipe == "mxfp8" else Float8RowwiseReluSquaredGroupedExperts
            assert type(cfg) is cls.Config
        else:  # the MTP block's
            assert not isinstance(dispatcher, TorchAOTokenDispatcher.Config), fqn


def test_mxfp8_on_hardware_pads_expert_groups_to_128():
    model = apply(model_registry("nano-30B").model, LowPrecisionConfig(experts="mxfp8"))
    pads = {
        parent.token_dispatcher.pad_multiple
        for _, _, parent, _ in model.traverse(ReluSquaredGroupedExperts.Config)
    }
    assert pads == {128}


def test_mtp_block_converts_when_asked_and_patterns_are_anchored():
    """Without ``mtp\\..*`` in keep_bf16 the MTP block converts too; a main-layer
    name kept exact does not keep its ``mtp.*`` namesake, which TorchTitan's
    substring filters would."""
    args = flavor_args("super-120B")
    assert args.hybrid_override_pattern[1] == args.mtp_hybrid_override_pattern[1] == "E"
    main_up = "layers.1.mixer.shared_experts.up_proj"
    mtp_up = "mtp." + main_up
    keep = ["lm_head", r".*\.in_proj\.dt", r".*\.fc[12]_latent_proj", main_up.replace(".", r"\.")]
    model = apply(
        model_registry("super-120B").model,
        LowPrecisionConfig(linear="mxfp8", experts="mxfp8", emulate=True, keep_bf16=keep),
    )
    linears, experts = converted(model)
    want_linears, want_experts = intended("super-120B", mtp=True)
    assert linears == want_linears - {main_up} and mtp_up in linears
    assert experts == want_experts
    # TorchTitan's filter: substring, so the MTP copy would be kept too.
    assert not module_filter_fn(Linear.Config(in_features=16, out_features=16), mtp_up, [main_up])


def test_torchtitans_unfiltered_converter_takes_the_router_gate_and_lm_head():
    """Why the package has its own Linear selection: TorchTitan's converter, as it
    comes, converts all 232 of Nano's Linears, fp32 router gate and lm_head included."""
    model = model_registry("nano-30B").model
    model = Float8LinearConverter.Config(emulate=True).build().convert(model)
    kinds = [type(c) for _, c, _, _ in model.traverse(Linear.Config)]
    assert len(kinds) == 232 and all(k is Float8Linear.Config for k in kinds)


def test_last_settings_win_and_bf16_restores_the_plain_tree():
    model = model_registry("debugmodel").model
    plain = repr(model)
    apply(model, LowPrecisionConfig(linear="mxfp8", experts="mxfp8", emulate=True))
    apply(model, LowPrecisionConfig(linear="float8_rowwise", experts="bf16"))
    linears, experts = converted(model)
    assert len(linears) == 57 and not experts
    assert all(
        type(c) is not MXFP8Linear.Config for _, c, _, _ in model.traverse(Linear.Config)
    )
    apply(model, LowPrecisionConfig())
    assert repr(model) == plain


def test_settings_are_checked_by_name():
    with pytest.raises(ValueError, match=r"low_precision.linear='fp8'"):
        LowPrecisionConfig(linear="fp8")
    with pytest.raises(ValueError, match=r"low_precision.experts='float8_rowwise_gw_hp'"):
        LowPrecisionConfig(experts="float8_rowwise_gw_hp")
    with pytest.raises(ValueError, match=r"keep_bf16: 'layers\(' is not a valid"):
        LowPrecisionConfig(linear="mxfp8", keep_bf16=["layers("])


def test_deepep_is_refused_with_quantized_experts():
    model = model_registry("nano-30B", moe_comm_backend="deepep").model
    with pytest.raises(ValueError, match=r"experts='mxfp8' with DeepEP .*refused"):
        apply(model, LowPrecisionConfig(experts="mxfp8"))
    apply(model, LowPrecisionConfig(linear="mxfp8"))  # Linears alone are fine


def test_tp_is_refused_and_ac_compile_mxfp8_experts_warned():
    lp = LowPrecisionConfig(linear="mxfp8", experts="mxfp8")
    with pytest.raises(ValueError, match=r"tensor_parallel_degree=2: refused \(pytorch #191992"):
        check_combination(lp, tensor_parallel_degree=2, ac_enabled=False, model_compiled=False)
    check_combination(
        LowPrecisionConfig(experts="mxfp8"),
        tensor_parallel_degree=2, ac_enabled=False, model_compiled=False,
    )  # fmt: skip
    with pytest.warns(UserWarning, match="torchtitan #1971"):
        check_combination(lp, tensor_parallel_degree=1, ac_enabled=True, model_compiled=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_combination(lp, tensor_parallel_degree=1, ac_enabled=True, model_compiled=False)
