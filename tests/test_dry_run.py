"""The dry run parallelizes the real model on meta in a fake world and sizes it:
shards add up, Nano-30B is the published size, refused layouts give the package's
one line, and the FSDP traffic formula equals the bytes FSDP really moves."""

import time
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from torchtitan_nemotron3.dry_run import (
    build_sharded,
    dry_run,
    job_from_args,
    main,
    parse_args,
)
from torchtitan_nemotron3.estimate import activations, comm
from torchtitan_nemotron3.estimate.layout import Layout
from torchtitan_nemotron3.estimate.shards import measure
from torchtitan_nemotron3.model import build_model_config, flavor_args
from torchtitan_nemotron3.sharding import check_parallelism

NANO_PARAMS = 31_577_937_344  # shared/docs/nemotronh.md


def _job(*argv):
    return job_from_args(parse_args(list(argv)))


@pytest.mark.parametrize("ngpu", [4, 8])
def test_fsdp_shards_of_every_rank_add_up_to_the_model(ngpu):
    r = dry_run(_job("--flavor", "debugmodel", "--ngpu", str(ngpu), "--seq_len", "64"))
    assert r.shards.source == "measured"
    assert r.shards.rank_numel == [r.shards.rank_numel[0]] * ngpu  # debug dims divide
    assert r.shards.rank_numel[0] * ngpu == r.shards.total_numel
    assert sum(r.memory.params.values()) * ngpu == 4 * r.shards.total_numel  # fp32


def test_nano_30b_fsdp8_on_meta_is_quick_and_the_published_size(capsys):
    t0 = time.perf_counter()
    assert main(["--flavor", "nano-30B", "--ngpu", "8", "--seq_len", "8192"]) == 0
    assert time.perf_counter() - t0 < 30
    out = capsys.readouterr().out
    assert f"{NANO_PARAMS:,} parameters" in out
    assert f"min {NANO_PARAMS // 8:,} / max {NANO_PARAMS // 8:,}" in out
    assert out.strip().splitlines()[-1].startswith("verdict: fits in 179 GiB per GPU")


def test_ep8_keeps_16_experts_per_rank_unsharded_by_fsdp():
    r = dry_run(_job("--flavor", "nano-30B", "--ngpu", "8", "--ep", "8"))
    experts = 23 * 128 * 2 * 1856 * 2688  # 23 MoE layers, up + down
    assert r.shards.local_numel["experts"] == experts // 8
    assert {g.mesh: g.shard for u in r.shards.units for g in u.groups} == {
        "fsdp": 8,
        "efsdp": 1,
    }
    assert r.traffic.by_dim["ep"] > 0 and r.traffic.by_dim["efsdp"] == 0


@pytest.mark.parametrize(
    "argv",
    [["--ep", "3"], ["--ngpu", "6", "--tp", "4"], ["--cp", "2", "--pp", "2"], ["--dp_shard", "3"]],
)
def test_refused_layouts_give_the_packages_one_line(argv, capsys):
    args = parse_args(["--flavor", "debugmodel", "--ngpu", "8", *argv])
    job = job_from_args(args)
    with pytest.raises(ValueError) as info:
        check_parallelism(job.parallelism, job.model_spec.model, world_size=job.ngpu)
    assert main(["--flavor", "debugmodel", "--ngpu", "8", *argv]) == 2
    captured = capsys.readouterr()
    assert captured.err == f"error: {info.value}\n" and not captured.out


@pytest.mark.parametrize(
    "toml,cp,ac,tokens_per_rank",
    [("nemotron3-nano-30B-64K.toml", 4, "selective", 16384),
     ("nemotron3-nano-30B-256K.toml", 8, "full", 32768)],
)  # fmt: skip
def test_long_context_recipes_fit_a_b200(toml, cp, ac, tokens_per_rank, capsys):
    """The long-context job files' layouts are the ones their comments justify,
    and the dry run still finds them within a B200's memory."""
    job = _job("--config", f"train_configs/{toml}")
    assert (job.parallelism.context_parallel_degree, job.ac) == (cp, ac)
    assert job.training.seq_len // cp == tokens_per_rank
    assert main(["--config", f"train_configs/{toml}"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith(
        "verdict: fits in 179 GiB per GPU"
    )


def test_toml_job_and_flags():
    job = _job("--config", "train_configs/debug_model.toml", "--ngpu", "4", "--ep", "2")
    assert (job.flavor, job.ac, job.training.seq_len) == (
        "debugmodel",
        "selective",
        256,
    )
    assert job.parallelism.expert_parallel_degree == 2
    assert dry_run(job).layout.efsdp == 2


def test_activation_estimate_orders_the_ac_modes():
    cfg = build_model_config(flavor_args("nano-30B"))
    est = {
        ac: activations.estimate(cfg, ac=ac, local_batch=1, seq_len=8192).total
        for ac in ("none", "selective", "full")
    }
    assert est["none"] > est["selective"] > est["full"] > 0


class _CollectiveBytes(TorchDispatchMode):
    """Bytes of the buffers FSDP's c10d all-gathers fill and reduce-scatters read."""

    def __init__(self):
        super().__init__()
        self.bytes = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        if name.startswith("c10d.") and "allgather" in name:
            self.bytes["all-gather"] += args[0].numel() * args[0].element_size()
        if name.startswith("c10d.") and "reduce_scatter" in name:
            self.bytes["reduce-scatter"] += args[1].numel() * args[1].element_size()
        return func(*args, **(kwargs or {}))


def test_fsdp_traffic_formula_matches_the_collectives_fsdp_issues():
    """One forward+backward of the FSDP-4 debug-width model, collectives counted
    at the dispatcher (the fake backend moves nothing, so values are garbage;
    the sizes are what is compared)."""
    job = _job(
        "--flavor", "debugmodel", "--ngpu", "4", "--seq_len", "64", "--ac", "none"
    )
    model, cfg, _ = build_sharded(job)
    try:
        model.to_empty(device="cpu")
        with torch.no_grad():
            model.init_weights(buffer_device=torch.device("cpu"))
        counted = _CollectiveBytes()
        with counted:
            model(torch.randint(0, cfg.vocab_size, (1, 64))).float().mean().backward()
        shards = measure(model, cfg.hybrid_override_pattern, 4)
    finally:
        torch.distributed.destroy_process_group()
    traffic = comm.estimate(
        shards,
        cfg,
        Layout.from_parallelism(job.parallelism, 4),
        local_batch=1,
        seq_len=64,
        ac="none",
    )
    rows = {what.split()[0]: n for _, what, n in traffic.rows}
    received = 3 / 4  # of each gathered / reduced buffer, per rank
    assert rows["all-gather"] == pytest.approx(counted.bytes["all-gather"] * received)
    assert rows["reduce-scatter"] == pytest.approx(
        counted.bytes["reduce-scatter"] * received
    )


@pytest.mark.parametrize(
    "argv", [["--pp", "2", "--local_batch_size", "2"], ["--tp", "2"]]
)
def test_pipeline_and_tensor_parallel_layouts_are_measured(argv):
    """The dry run measures PP and TP layouts with the package's real layout."""
    job = _job("--flavor", "debugmodel", "--ngpu", "4", "--seq_len", "64", *argv)
    check_parallelism(job.parallelism, job.model_spec.model, world_size=4)
    r = dry_run(job)
    dim = "pp" if "--pp" in argv else "tp"
    assert r.traffic.by_dim[dim] > 0
    held = [n for n in r.shards.rank_numel if n]
    assert sum(held) < 4 * r.shards.total_numel / 2  # split by PP stage or TP


@pytest.mark.parametrize(
    "toml,ngpu,ac,gib",
    [("nemotron3-super-120B.toml", 64, "selective", 143.2),
     ("nemotron3-ultra-550B.toml", 128, "full", 97.8)],
)  # fmt: skip
def test_super_and_ultra_recipes_fit_a_b200(toml, ngpu, ac, gib, capsys):
    """The Super/Ultra job files build with MTP under EP on their GPU counts, and
    the dry run gives the per-GPU memory their comments quote."""
    argv = ["--config", f"train_configs/{toml}", "--ngpu", str(ngpu)]
    job = _job(*argv)
    assert job.ac == ac and job.parallelism.expert_parallel_degree == 8
    assert job.model_spec.model.mtp is not None
    assert job.model_spec.model.mtp.num_depths == 2
    assert main(argv) == 0
    verdict = capsys.readouterr().out.strip().splitlines()[-1]
    assert verdict.startswith(f"verdict: fits in 179 GiB per GPU: {gib} GiB"), verdict


def test_latent_moe_and_mtp_enter_the_activation_estimate():
    """Latent MoE: routed tokens are S wide (plus fc1's output and fc2's input);
    MTP: its sub-layers once per depth."""
    cfg = build_model_config(flavor_args("super-120B"))
    moe = next(layer for layer in cfg.layers if layer.layer_type == "E")
    m = moe.mixer
    D, S = 4096, 1024
    k, E, F = m.router.top_k, m.num_experts, m.routed_experts.inner_experts.hidden_dim
    per_token = activations.saved_per_token(moe, "selective", ep=8)
    assert (per_token.elems, per_token.fp32) == (
        D + k * (F + S) + 2 * k * S + D + 2 * S,
        E + 3 * k,
    )
    est = activations.estimate(cfg, ac="selective", local_batch=1, seq_len=8192)
    assert est.layers == 88 + 2 * 2
