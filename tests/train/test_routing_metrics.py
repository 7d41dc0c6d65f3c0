"""Routing figures (``train/routing_metrics.py``) on routing known in advance.

Unit: the figures and the heatmap from given counts; the debug model's own
counts under TorchTitan's forced balanced routing (imbalance exactly 1, no empty
expert) and under a correction bias that sends every token to experts 0 and 1.
Integration (the real trainer through ``run_train.sh``, TensorBoard on): the same
figures as TensorBoard scalars, the heatmap as an image; the biased run under
EP=2 (all tokens on EP rank 0: EP imbalance 2), its step-2 bias after exactly one
TorchTitan bias update.
"""

from __future__ import annotations

import math

import pytest
import torch
from nemotron_testing import build_model

from torchtitan_nemotron3.model import flavor_args
from torchtitan_nemotron3.train.routing_metrics import (
    RoutingMetricsConfig,
    heatmap_image,
    layer_stats,
    moe_layers,
)

E, K = 8, 2  # the debug flavor's experts and top-k


def test_layer_stats_from_counts():
    counts = torch.tensor([[4.0, 4, 4, 4], [10, 0, 6, 0]])
    bias = torch.tensor([[0.0, 0, 0, 0], [3.0, -4, 0, 0]])
    stats = layer_stats(counts, bias, ep=2).tolist()
    assert stats[0] == [1.0, 0.0, 0.0, 0.0, 0.0, 1.0]
    # mean 4: max 10 -> 2.5; 2 empty; |bias| 5; EP ranks get 10 and 6 of mean 8
    assert stats[1] == [2.5, 2.0, 5.0, -4.0, 3.0, 10 / 8]
    no_bias = layer_stats(counts, None).tolist()
    assert no_bias[1][:2] == [2.5, 2.0] and all(math.isnan(v) for v in no_bias[1][2:])
    with pytest.raises(ValueError, match="heatmap_freq=-1"):
        RoutingMetricsConfig(heatmap_freq=-1)


def test_heatmap_colours():
    counts = torch.tensor([[16.0, 0, 0, 0, 4, 0, 2, 10], [1, 7, 4, 4, 4, 4, 0, 8]])
    img = heatmap_image(counts, cell=2)  # both rows: mean 4
    assert img.shape == (4, 16, 3) and img.dtype == torch.uint8
    assert img[0, 0].tolist() == [255, 0, 0]  # 4x the mean: red
    assert img[0, 2].tolist() == [0, 0, 0]  # no token: black
    assert img[0, 8].tolist() == [255, 255, 255]  # at the mean: white
    assert img[0, 12].tolist() == [128, 128, 255]  # half the mean: light blue
    assert img[2, 0].tolist() == [0, 0, 255]  # a quarter of the mean: blue
    assert img[2, 14].tolist() == [255, 128, 128]  # twice the mean: light red
    assert img[1, 1].tolist() == img[0, 0].tolist()  # a cell is 2 x 2 pixels


def _train_forward(model, tokens=64):
    model.train()
    ids = torch.randint(0, model.lm_head.weight.size(0), (2, tokens // 2))
    with torch.no_grad():
        model(ids)
    layers = moe_layers([model])
    assert len(layers) == 5
    counts = torch.stack([moe.tokens_per_expert_E for _, _, moe in layers])
    bias = torch.stack([moe.expert_bias_E for _, _, moe in layers])
    return counts, bias


def test_forced_balanced_routing_is_imbalance_one():
    model = build_model(flavor_args("debugmodel"), seed=0)
    for _, _, moe in moe_layers([model]):
        moe.router._debug_force_load_balance = True
    counts, bias = _train_forward(model)
    assert counts.sum(-1).tolist() == [64 * K] * 5
    stats = layer_stats(counts, bias, ep=2)
    assert stats[:, 0].tolist() == [1.0] * 5  # imbalance
    assert stats[:, 1].tolist() == [0.0] * 5  # empty experts
    assert stats[:, 5].tolist() == [1.0] * 5  # EP imbalance


def test_router_biased_to_two_experts():
    model = build_model(flavor_args("debugmodel"), seed=0)
    with torch.no_grad():
        for _, _, moe in moe_layers([model]):
            moe.router.gate.weight.zero_()
            moe.expert_bias_E.copy_(torch.tensor([10.0, 9] + [0.0] * (E - 2)))
    counts, bias = _train_forward(model)
    assert counts[:, :2].tolist() == [[64.0, 64.0]] * 5 and counts[:, 2:].sum() == 0
    stats = layer_stats(counts, bias, ep=2)
    expected = [E / K, E - K, math.sqrt(181), 0.0, 10.0, 2.0]
    for row in stats.tolist():
        assert row == pytest.approx(expected, rel=1e-6)


# ------------------------------------------------------------------ integration

SMALL = [
    "--training.steps", "2", "--training.local_batch_size", "2",
    "--training.seq_len", "64", "--metrics.log_freq", "1",
    "--metrics.enable_tensorboard", "--routing_metrics.heatmap_freq", "2",
]  # fmt: skip


def _events(dump):
    from tensorboard.backend.event_processing.event_accumulator import (
        EventAccumulator,
    )

    (run_dir,) = {p.parent for p in (dump / "tb").rglob("events.out.tfevents.*")}
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    scalars = {
        tag: {e.step: e.value for e in acc.Scalars(tag)}
        for tag in acc.Tags()["scalars"]
        if tag.startswith("routing/")
    }
    return scalars, {t: acc.Images(t) for t in acc.Tags()["images"]}


def _png_size(png: bytes) -> tuple[int, int]:
    return int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")


@pytest.mark.integration
def test_balanced_run_in_tensorboard(tmp_path):
    from train._harness import REPO_ROOT, run_training

    overrides = [*SMALL, "--debug.moe_force_load_balance"]
    run_training(REPO_ROOT / "train_configs/debug_model.toml", 1, overrides, tmp_path)
    scalars, images = _events(tmp_path / "outputs")
    layers = ["layer1", "layer4", "layer8", "layer11", "layer13"]
    for layer in layers:
        assert scalars[f"routing/{layer}/imbalance"] == {1: 1.0, 2: 1.0}
        assert scalars[f"routing/{layer}/empty_experts"] == {1: 0.0, 2: 0.0}
        assert f"routing/{layer}/ep_imbalance" not in scalars
        # the bias moves by at most 2 x 1e-3 a step (forced routing: no move)
        assert scalars[f"routing/{layer}/bias_norm"][1] == 0.0
    assert scalars["routing/imbalance_max"] == {1: 1.0, 2: 1.0}
    (image,) = images["routing/load"]  # step 2 only (heatmap_freq 2)
    assert image.step == 2 and _png_size(image.encoded_image_string) == (8 * E, 8 * 5)


@pytest.mark.integration
def test_biased_router_under_ep_in_tensorboard(tmp_path):
    """Every token to experts 0 and 1 (on EP rank 0) on 2 ranks, EP=2: imbalance
    E/K, E-K empty experts, EP imbalance 2; the bias as set at step 1, after one
    TorchTitan update (coeff 1e-3 · sign(mean - load), centred) at step 2."""
    from train._harness import REPO_ROOT, run_training

    overrides = [
        *SMALL, "--job.module", "tests.train.routing_config",
        "--job.config", "nemotron3_debug_biased_router",
        "--parallelism.expert_parallel_degree", "2",
    ]  # fmt: skip
    run_training(REPO_ROOT / "train_configs/debug_model.toml", 2, overrides, tmp_path)
    scalars, images = _events(tmp_path / "outputs")
    step2 = torch.tensor([10.0, 9] + [0.0] * 6) + torch.tensor(
        [-1.5e-3] * 2 + [0.5e-3] * 6
    )
    for layer in ["layer1", "layer4", "layer8", "layer11", "layer13"]:
        fig = {k.rsplit("/", 1)[1]: v for k, v in scalars.items() if f"/{layer}/" in k}
        assert fig["imbalance"] == {1: E / K, 2: E / K}
        assert fig["empty_experts"] == {1: E - K, 2: E - K}
        assert fig["ep_imbalance"] == {1: 2.0, 2: 2.0}
        assert fig["bias_max"] == {1: 10.0, 2: pytest.approx(10 - 1.5e-3, abs=1e-6)}
        assert fig["bias_min"] == {1: 0.0, 2: pytest.approx(0.5e-3, abs=1e-6)}
        assert fig["bias_norm"][1] == pytest.approx(math.sqrt(181), rel=1e-6)
        assert fig["bias_norm"][2] == pytest.approx(step2.norm().item(), rel=1e-6)
    assert scalars["routing/empty_experts"] == {1: 5.0 * (E - K), 2: 5.0 * (E - K)}
    assert [i.step for i in images["routing/load"]] == [2]
