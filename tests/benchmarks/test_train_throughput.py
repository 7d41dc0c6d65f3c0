"""benchmarks/train_throughput.py: its log parsing and layout flags, and one tiny
CPU run through run_train.sh (whose numbers mean nothing, which it says)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import train_throughput as tt

LOG = """\
[titan] Model nemotron3 nano-30B size: 31,577,937,344 total parameters
[titan] \x1b[31mstep:  1  \x1b[32mloss: 12.00000  grad_norm:  3.1000  memory: 70.10GiB(39.16%)  tps: 1,000  tflops: 20.76  mfu: 2.10%
[titan] step:  2  loss: 11.00000  grad_norm:  2.9000  memory: 71.50GiB(39.94%)  tps: 30,000  tflops: 622.80  mfu: 62.95%
[titan] step:  3  loss: 10.50000  grad_norm:  2.8000  memory: 71.00GiB(39.66%)  tps: 32,000  tflops: 664.32  mfu: N/A
"""


def test_parses_torchtitans_step_lines():
    steps, flavor = tt.parse_log(LOG)
    assert flavor == "nano-30B"
    assert steps == {
        1: (70.1, 1000.0, 2.1),
        2: (71.5, 30000.0, 62.95),
        3: (71.0, 32000.0, None),
    }
    s = tt.summarize({"steps": steps}, warmup=1, flops=20.76e9, peak=2250.0)
    assert (s["n"], s["tps"], s["mem"]) == (2, 31000.0, 71.5)
    assert s["mfu"] == pytest.approx(100 * 31000 * 20.76e9 / 2250e12)


def test_layout_terms_become_parallelism_flags():
    assert tt.layout_flags("ep8+tp2") == [
        "--parallelism.expert_parallel_degree",
        "8",
        "--parallelism.tensor_parallel_degree",
        "2",
    ]
    assert tt.layout_flags("fsdp") == [
        "--parallelism.data_parallel_shard_degree",
        "-1",
        "--parallelism.expert_parallel_degree",
        "1",
    ]
    with pytest.raises(SystemExit):
        tt.layout_flags("ep")


@pytest.mark.integration
def test_cpu_smoke_run_prints_the_table(tmp_path, capsys):
    rows = tt.main(
        [
            "--config",
            "train_configs/debug_model.toml",
            "--ngpu",
            "1",
            "--layout",
            "fsdp",
            "--warmup",
            "0",
            "--steps",
            "1",
            "--seq_len",
            "64",
            "--local_batch_size",
            "1",
            "--out",
            str(tmp_path),
            "--timeout",
            "300",
        ]
    )
    out = capsys.readouterr().out
    assert "absolute numbers mean nothing" in out
    assert rows[0]["tps"] > 0 and rows[0]["flavor"] == "debugmodel", rows[0].get(
        "error"
    )
    assert "| fsdp | 1 |" in out and (tmp_path / "fsdp" / "train.log").is_file()
