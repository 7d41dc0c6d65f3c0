"""Every row of an epoch once across 2 gloo ranks × 2 dataloader workers each."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def test_two_ranks_two_workers_serve_every_row_once(tmp_path):
    from data_helpers import random_docs

    from torchtitan_nemotron3.data.indexed import IndexedDatasetWriter
    from torchtitan_nemotron3.data.rows import SourceRows
    from torchtitan_nemotron3.data.sources import MegatronSource

    prefix = str(tmp_path / "corpus_text_document")
    with IndexedDatasetWriter(prefix, np.uint16) as w:
        for d in random_docs(300, seed=5, vocab=200, max_len=60):
            w.add_document(d % 60000)
        w.commit()
    out = tmp_path / "rows.json"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("gloo_worker.py")), str(r), "2",
             str(tmp_path / "init"), prefix, "2", str(out)],
            env=env,
        )
        for r in range(2)
    ]  # fmt: skip
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    per_rank = json.loads(out.read_text())
    # reference: the source's epoch-0 rows, in whole global batches of 2 × 2
    rows = SourceRows(MegatronSource(prefix), seq_len=32, seed=1234)
    n = rows.rows_per_epoch // 4 * 4
    expected = []
    for q in range(n):
        h = hashlib.sha1()
        for a in rows.row(q)[:3]:
            h.update(a.astype(np.int64).tobytes())
        expected.append(h.hexdigest())
    got = per_rank[0] + per_rank[1]
    assert len(got) == n == len(set(got)) and sorted(got) == sorted(expected)
    assert len(per_rank[0]) == len(per_rank[1]) == n // 2
