"""Named validation sets: parsing, and each set's metrics under its name."""

import types

import pytest

from torchtitan_nemotron3.data.validation import _NamedMetrics, parse_sets


def test_parse_sets():
    assert parse_sets(["web=data/web_valid", "mix=0.5 a 0.5 b"]) == [
        ("web", "data/web_valid"),
        ("mix", "0.5 a 0.5 b"),
    ]
    for bad, msg in [("web", "is not 'name=<prefix or blend>'"), ("=x", "is not"),
                     ("w=0 a 1 b", "weight 0 of a must be finite and > 0")]:
        with pytest.raises(ValueError, match=msg):
            parse_sets([bad])
    with pytest.raises(ValueError, match="name 'a' used twice"):
        parse_sets(["a=x", "a=y"])


def test_each_set_logs_under_its_name_and_resets_the_counters():
    logged = []
    real = types.SimpleNamespace(
        logger=types.SimpleNamespace(log=lambda m, s: logged.append((s, m))),
        time_last_log=0.0,
        ntokens_since_last_log=0,
        parallel_dims=types.SimpleNamespace(non_data_parallel_size=1),
        device_memory_monitor=types.SimpleNamespace(reset_peak_stats=lambda: None),
    )
    proxy = _NamedMetrics(real, "web")
    proxy.ntokens_since_last_log += 128  # what Validator.validate does, through the proxy
    assert real.ntokens_since_last_log == 128
    proxy.log_validation(loss=2.5, step=7)
    (step, metrics), = logged
    assert step == 7 and metrics["validation/web/loss"] == 2.5
    assert "validation/web/throughput(tps)" in metrics and "validation_metrics/loss" not in metrics
    assert real.ntokens_since_last_log == 0 and real.time_last_log > 0
