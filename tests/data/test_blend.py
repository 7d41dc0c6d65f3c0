"""Blend strings and Megatron's greedy blend rule."""

import numpy as np
import pytest

from torchtitan_nemotron3.data.blend import BlendError, GreedyBlend, parse_blend


def test_parse_pairs_and_single_prefix():
    entries = parse_blend("0.7 data/web_text_document 0.3 data/code_text_document")
    assert [(e.weight, e.spec) for e in entries] == [
        (0.7, "data/web_text_document"),
        (0.3, "data/code_text_document"),
    ]
    assert [(e.weight, e.spec) for e in parse_blend("3 a 1 b")] == [(0.75, "a"), (0.25, "b")]
    assert [(e.weight, e.spec) for e in parse_blend("data/x")] == [(1.0, "data/x")]


@pytest.mark.parametrize(
    "blend, expected",
    [
        ("", "empty"),
        ("0 a 1 b", "weight 0 of a must be finite and > 0"),
        ("-0.5 a 1 b", "weight -0.5 of a must be finite and > 0"),
        ("nan a 1 b", "weight nan of a must be finite and > 0"),
        ("inf a 1 b", "weight inf of a must be finite and > 0"),
        ("x a 1 b", "weight 'x' (before a) is not a number"),
        ("0.5 a 0.5", "3 tokens; expected weight/source pairs"),
        ("0.5", "weight 0.5 names no source"),
        ("0.5 1 0.5 b", "'1' after weight 0.5 is a number, not a source"),
        ("1 a 1 a", "source a listed twice"),
    ],
)
def test_bad_blends_are_one_line_errors(blend, expected):
    with pytest.raises(BlendError) as e:
        parse_blend(blend)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("dataloader.blend") and expected in msg


def _sources(blend: GreedyBlend, n: int) -> np.ndarray:
    return np.array([blend.locate(i)[0] for i in range(n)])


def test_within_one_row_of_each_weight_at_every_prefix():
    w = np.array([0.5, 0.3, 0.2])
    n = 100_000
    src = _sources(GreedyBlend(list(w)), n)
    counts = np.cumsum(np.eye(3, dtype=np.int64)[src], axis=0)  # [n, 3] after row i
    rows = np.arange(1, n + 1)[:, None]
    assert np.abs(counts - w * rows).max() <= 1.0
    share = counts[99:] / rows[99:]  # from 100 rows on: within 1%
    assert np.abs(share - w).max() <= 0.01
    # each source's own rows are numbered 0, 1, 2, ... in order
    blend = GreedyBlend(list(w))
    for k in range(3):
        idx = [blend.locate(i)[1] for i in np.flatnonzero(src[:3000] == k)]
        assert idx == list(range(len(idx)))


def test_counts_and_random_access_agree_with_a_forward_walk():
    w = [0.6, 0.25, 0.15]
    ref = _sources(GreedyBlend(w), 3 * GreedyBlend.CHUNK)
    blend = GreedyBlend(w)
    for i in (150_000, 5, 70_000, 196_607, 0):  # backwards too: recomputed from 0
        assert blend.locate(i)[0] == ref[i]
        expected = np.bincount(ref[:i], minlength=3)
        assert list(blend.counts(i)) == list(expected), i


def test_equals_megatron_build_blending_indices():
    helpers = pytest.importorskip("megatron.core.datasets.helpers_cpp")
    w = np.array([0.5, 0.3, 0.2])
    n = 20_000
    ds_index = np.zeros(n, dtype=np.int16)
    ds_sample = np.zeros(n, dtype=np.int64)
    helpers.build_blending_indices(ds_index, ds_sample, w, 3, n, False)
    blend = GreedyBlend(list(w))
    ours = np.array([blend.locate(i) for i in range(n)])
    assert np.array_equal(ours[:, 0], ds_index)
    assert np.array_equal(ours[:, 1], ds_sample)
