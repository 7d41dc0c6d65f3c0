"""Which Linear configs the default LoRA targets match (TorchTitan matches the last
FQN segment only), and the refusals: routed experts, names that match nothing."""

import re

import pytest

from torchtitan_nemotron3 import build_model_config, flavor_args, model_registry
from torchtitan_nemotron3.lora import DEFAULT_TARGET_MODULES, NemotronHLoRAConverter
from torchtitan_nemotron3.lora.converter import adapted_fqns
from torchtitan_nemotron3.model.pattern import ATTENTION, MAMBA, MLP, MOE

EXPECTED = {
    MAMBA: [f"in_proj.{p}" for p in ("z", "x", "B", "C", "dt")] + ["out_proj"],
    ATTENTION: ["q_proj", "k_proj", "v_proj", "o_proj"],
    MLP: ["up_proj", "down_proj"],
    MOE: ["shared_experts.up_proj", "shared_experts.down_proj"],
}


@pytest.mark.parametrize("flavor", ["debugmodel", "nano-30B"])
def test_default_targets_are_exactly_the_intended_linears(flavor):
    pattern = flavor_args(flavor).hybrid_override_pattern
    spec = model_registry(flavor, converters=[NemotronHLoRAConverter.Config()])
    got = {fqn for fqn, _ in adapted_fqns(spec.model)}
    want = {
        f"layers.{i}.mixer.{name}"
        for i, s in enumerate(pattern)
        for name in EXPECTED[s]
    }
    assert got == want
    # never the head, the router, the convs, the routed experts
    assert not any(
        re.search(r"lm_head|router|conv1d|experts\.", f) and "shared" not in f
        for f in got
    )
    # LoRA keeps the whole base fixed: no routing-bias update hook
    assert spec.post_optimizer_build_fn is None
    assert model_registry(flavor).post_optimizer_build_fn is not None


def test_default_target_names():
    assert set(DEFAULT_TARGET_MODULES) == {
        "z",
        "x",
        "B",
        "C",
        "dt",
        "out_proj",
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "up_proj",
        "down_proj",
    }


@pytest.mark.parametrize(
    "kw",
    [
        {"routed_experts": True},
        {"target_modules": ["q_proj", "w1_EFD"]},
        {"target_modules": ["experts"]},
    ],
)
def test_routed_experts_are_refused(kw):
    with pytest.raises(NotImplementedError, match="routed experts"):
        NemotronHLoRAConverter.Config(**kw)


def test_unknown_target_is_refused():
    """``gate_proj`` (a Llama name) does not exist in NemotronH: an error naming the
    real names, not a run that trains nothing."""
    cfg = build_model_config(flavor_args("debugmodel"))
    conv = NemotronHLoRAConverter.Config(target_modules=["gate_proj", "q_proj"]).build()
    with pytest.raises(ValueError, match=r"\['gate_proj'\] match no Linear"):
        conv.convert(cfg)


def test_lora_before_quantization_is_refused():
    """TorchTitan's converter order check applies (quantization before LoRA)."""
    from torchtitan.components.quantization.float8 import Float8LinearConverter

    with pytest.raises(ValueError, match="before LoRAConverter"):
        model_registry(
            "debugmodel",
            converters=[
                NemotronHLoRAConverter.Config(),
                Float8LinearConverter.Config(emulate=True),
            ],
        )
