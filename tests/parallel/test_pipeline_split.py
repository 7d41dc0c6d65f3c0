"""Where NemotronH's pipeline stages split, and the config-time checks (one process).

- a Megatron pattern's ``|`` segments survive parsing as ``pipeline_segments``
  while ``hybrid_override_pattern`` and the HF ``config.json`` stay symbols-only;
- without ``|``, the cost-balanced split beats TorchTitan's layer-count split on
  Nano (bottleneck stage and max/min stage cost), at 2, 4 and 8 stages;
- the split model run stage after stage, ``positions`` given to every stage,
  gives the logits of the whole model;
- every layout NemotronH cannot pipeline is one ``ValueError`` line naming the
  numbers.
"""

import dataclasses

import pytest
import torch
from nemotron_testing import build_model
from torchtitan.config import ParallelismConfig
from torchtitan.distributed.pipeline_parallel import (
    _generate_llm_fqn_per_model_part,
    _split_module,
)

from torchtitan_nemotron3.hf.config import hf_config_from_args
from torchtitan_nemotron3.model import build_model_config, flavor_args
from torchtitan_nemotron3.model.pattern import pipeline_segments
from torchtitan_nemotron3.pipeline import (
    check_pipeline_parallel,
    module_fqns_per_stage,
    piece_costs,
    stage_costs,
    stage_layer_ranges,
)
from torchtitan_nemotron3.sharding import check_parallelism

DEBUG = flavor_args("debugmodel")  # "MEM*EM-MEM*EMEM-"
MEGATRON = "MEM*|EM-M|EM*E|M-ME"  # 16 layers, 4 segments of 4
NANO = build_model_config(flavor_args("nano-30B"))
DEBUG_CONFIG = build_model_config(DEBUG)


def _ranges_of(fqns: list[list[str]]) -> list[range]:
    layers = [[int(n.split(".")[1]) for n in stage if n.startswith("layers.")] for stage in fqns]
    return [range(ls[0], ls[-1] + 1) if ls else range(0) for ls in layers]


def test_pipe_segments_are_kept_beside_the_canonical_pattern():
    args = DEBUG.replace(hybrid_override_pattern=MEGATRON, num_hidden_layers=None)
    assert args.hybrid_override_pattern == MEGATRON.replace("|", "")
    assert args.pipeline_segments == (4, 4, 4, 4)
    assert pipeline_segments(MEGATRON) == (4, 4, 4, 4)
    assert pipeline_segments("ME|M*|") == (2, 2, 0)  # a last stage of norm + lm_head
    assert pipeline_segments("MEM") is None
    # config.json is the same with or without the separators
    plain = DEBUG.replace(hybrid_override_pattern=MEGATRON.replace("|", ""), num_hidden_layers=None)
    assert plain.pipeline_segments is None
    assert hf_config_from_args(args) == hf_config_from_args(plain)
    assert "pipeline_segments" not in hf_config_from_args(args)
    assert build_model_config(args).pipeline_segments == (4, 4, 4, 4)
    # a new pattern brings its own boundaries
    assert args.replace(hybrid_override_pattern="M*M-", num_hidden_layers=None).pipeline_segments is None


def test_pipeline_segments_must_cover_the_pattern():
    with pytest.raises(ValueError, match=r"pipeline_segments=\(4, 4\).*16 layers"):
        dataclasses.replace(DEBUG, pipeline_segments=(4, 4))


def test_segments_are_the_stages():
    args = build_model_config(
        DEBUG.replace(hybrid_override_pattern="MEM*EM|-MEM*E|MEM-", num_hidden_layers=None)
    )
    assert stage_layer_ranges(args) == [range(6), range(6, 12), range(12, 16)]
    assert module_fqns_per_stage(stage_layer_ranges(args))[0][:2] == ["tok_embeddings", "layers.0"]
    assert module_fqns_per_stage(stage_layer_ranges(args))[-1][-2:] == ["norm", "lm_head"]
    with pytest.raises(ValueError, match="2 pipeline stages asked for.*3 segments"):
        stage_layer_ranges(args, 2)


@pytest.mark.parametrize("num_stages", [2, 4, 8])
def test_cost_split_beats_layer_count_split_on_nano(num_stages):
    """Max/min stage cost (training FLOPs per token, lm_head and embeddings
    included) of our split against TorchTitan's default (layer count, embeddings
    and norm+lm_head weighted as one layer each) and a plain even split."""
    ours = stage_costs(NANO, stage_layer_ranges(NANO, num_stages))
    titan = stage_costs(
        NANO, _ranges_of(_generate_llm_fqn_per_model_part(num_stages, 52, 1, 1))
    )
    even = stage_costs(NANO, [range(i * 52 // num_stages, (i + 1) * 52 // num_stages)
                              for i in range(num_stages)])

    def ratio(costs):
        flops = [c.flops for c in costs]
        return max(flops) / min(flops), max(flops)

    (r_ours, max_ours), (r_titan, max_titan), (r_even, max_even) = (
        ratio(ours), ratio(titan), ratio(even)
    )
    print(
        f"\nNano, {num_stages} stages, max/min stage FLOPs: cost split {r_ours:.3f}, "
        f"TorchTitan layer count {r_titan:.3f}, even layers {r_even:.3f}; bottleneck "
        f"stage {max_ours / 1e9:.2f} vs {max_titan / 1e9:.2f} vs {max_even / 1e9:.2f} "
        "GFLOP/token"
    )
    assert max_ours < min(max_titan, max_even)
    assert r_ours < min(r_titan, r_even)
    assert r_ours < 1.2


def test_split_forward_equals_whole_model():
    """Stage after stage (2 stages, and 4 as Interleaved1F1B splits it), each with
    ``positions``: the whole model's logits. Without ``positions`` on the last
    stage, documents leak into each other there."""
    model = build_model(DEBUG).eval()
    tokens = torch.randint(0, DEBUG.vocab_size, (2, 96))
    positions = torch.cat([torch.arange(40), torch.arange(56)])[None].repeat(2, 1)
    with torch.no_grad():
        whole = model(tokens, positions=positions)
        for num_stages in (2, 4):
            fqns = module_fqns_per_stage(stage_layer_ranges(DEBUG_CONFIG, num_stages))
            h = tokens
            for names in fqns:
                h = _split_module(model, names)(h, positions=positions)
            torch.testing.assert_close(h, whole, rtol=0, atol=0)
        first, last = (_split_module(model, names) for names in module_fqns_per_stage(
            stage_layer_ranges(DEBUG_CONFIG, 2)))
        assert first.lm_head is None and last.tok_embeddings is None
        leaked = last(first(tokens, positions=positions))
        assert not torch.allclose(leaked[:, 40:], whole[:, 40:], atol=1e-4)


def test_split_forward_with_mtp_equals_whole_model():
    """With MTP the first stage embeds the shifted ids and every stage passes them
    on; the last stage, which holds the block, gives the whole model's main and
    per-depth logits exactly. The block's cost counts on the last stage."""
    args = flavor_args("debugmodel-mtp")
    config = build_model_config(args)
    model = build_model(args).eval()
    tokens = torch.randint(0, args.vocab_size, (2, 96))
    positions = torch.cat([torch.arange(40), torch.arange(56)])[None].repeat(2, 1)
    with torch.no_grad():
        whole = model(tokens, positions=positions)
        for num_stages in (2, 4):
            fqns = module_fqns_per_stage(stage_layer_ranges(config, num_stages), mtp=True)
            assert fqns[-1][-1] == "mtp"
            out = (tokens,)
            for names in fqns:
                out = _split_module(model, names)(*out, positions=positions)
                if names is not fqns[-1]:
                    assert len(out) == 1 + args.mtp_num_layers  # hidden, e_1, e_2
            assert len(out) == len(whole) == 1 + args.mtp_num_layers
            for got, ref in zip(out, whole):
                torch.testing.assert_close(got, ref, rtol=0, atol=0)
    head = piece_costs(config)[2]
    head_without = piece_costs(build_model_config(args.replace(mtp_num_layers=0)))[2]
    assert head.flops > 2 * head_without.flops and head.params > head_without.params


def _pp(**kw) -> ParallelismConfig:
    return ParallelismConfig(spmd_backend="partial_dtensor", **kw)


def _error(args, parallelism, local_batch_size=None) -> str:
    with pytest.raises(ValueError) as info:
        check_pipeline_parallel(args, parallelism, local_batch_size=local_batch_size)
    message = str(info.value)
    assert "\n" not in message
    return message


SEGMENTED = DEBUG.replace(hybrid_override_pattern=MEGATRON, num_hidden_layers=None)
TOO_FEW_MICROBATCHES = (
    "2 microbatches (training.local_batch_size=2 / pipeline_parallel_microbatch_size=1) "
    "for 4 pipeline stages"
)


@pytest.mark.parametrize(
    "args,parallelism,batch,expected",
    [
        (SEGMENTED, _pp(pipeline_parallel_degree=3, pipeline_parallel_schedule="Interleaved1F1B"),
         None, "4 '|' segments [4, 4, 4, 4] are not a multiple of parallelism.pipeline_parallel_degree=3"),
        (SEGMENTED, _pp(pipeline_parallel_degree=2), None,
         "'1F1B' runs one stage per rank, but the pattern's 4 '|' segments [4, 4, 4, 4] give 2 per rank"),
        (SEGMENTED, _pp(pipeline_parallel_degree=4, pipeline_parallel_schedule="Interleaved1F1B"),
         None, "'Interleaved1F1B' needs >= 2 stages per rank, but the pattern's 4 '|' segments [4, 4, 4, 4] give 1"),
        (SEGMENTED, _pp(pipeline_parallel_degree=2, pipeline_parallel_schedule="ZBVZeroBubble"),
         None, "places stages in a V"),
        (SEGMENTED, _pp(pipeline_parallel_degree=4, pipeline_parallel_layers_per_stage=4),
         None, "pipeline_parallel_layers_per_stage=4 and the pattern's 4 '|' segments"),
        (SEGMENTED, _pp(pipeline_parallel_degree=2, module_fqns_per_model_part=[["layers.0"]] * 2),
         None, "parallelism.module_fqns_per_model_part and the pattern's 4 '|' segments"),
        (DEBUG.replace(hybrid_override_pattern="ME||M*", num_hidden_layers=None),
         _pp(pipeline_parallel_degree=3), None, "inner segments [1] hold no layer"),
        (DEBUG, _pp(pipeline_parallel_degree=9, pipeline_parallel_schedule="Interleaved1F1B"),
         None, ("18 pipeline stages (parallelism.pipeline_parallel_degree=9, schedule "
                "'Interleaved1F1B') for 16 layers")),
        (DEBUG, _pp(pipeline_parallel_degree=2, pipeline_parallel_microbatch_size=3), 4,
         "training.local_batch_size=4 is not a multiple of parallelism.pipeline_parallel_microbatch_size=3"),
        (DEBUG, _pp(pipeline_parallel_degree=4), 2, TOO_FEW_MICROBATCHES),
        (DEBUG, _pp(pipeline_parallel_degree=2, pipeline_parallel_schedule="Interleaved1F1B"), 2,
         TOO_FEW_MICROBATCHES),
        (DEBUG, _pp(pipeline_parallel_degree=2, pipeline_parallel_schedule="NoSuchSchedule"),
         None, "parallelism.pipeline_parallel_schedule='NoSuchSchedule'"),
        (flavor_args("debugmodel-mtp"),
         _pp(pipeline_parallel_degree=2, module_fqns_per_model_part=[
             ["tok_embeddings", "layers.0"], ["layers.1", "norm", "lm_head"]]),
         None, "the model has an MTP block, so the last part must list 'mtp'"),
    ],
)
def test_layouts_pipeline_cannot_run_are_refused(args, parallelism, batch, expected):
    assert expected in _error(args, parallelism, batch)


@pytest.mark.parametrize(
    "args,parallelism",
    [
        (DEBUG, _pp(pipeline_parallel_degree=2)),
        (DEBUG, _pp(pipeline_parallel_degree=2, pipeline_parallel_schedule="Interleaved1F1B")),
        (SEGMENTED, _pp(pipeline_parallel_degree=4)),
        (SEGMENTED, _pp(pipeline_parallel_degree=2, pipeline_parallel_schedule="Interleaved1F1B")),
        (flavor_args("debugmodel-mtp"), _pp(pipeline_parallel_degree=2)),
    ],
)
def test_layouts_pipeline_runs_are_accepted(args, parallelism):
    check_pipeline_parallel(args, parallelism, local_batch_size=4)
    check_parallelism(parallelism, build_model_config(args))  # the config-time hook
