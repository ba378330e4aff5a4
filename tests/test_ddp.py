"""A 2-process DDP run on CPU (gloo) equals a single-process run with the same global batch."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vidssl.engine.checkpoint import read_weights

WORKER = Path(__file__).with_name("ddp_worker.py")


def run(cmd, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]


@pytest.mark.slow
def test_two_process_gloo_matches_single_process(tmp_path):
    run([sys.executable, str(WORKER), str(tmp_path / "single")], tmp_path)
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER),
         str(tmp_path / "ddp")], tmp_path)
    a, _, sa = read_weights(tmp_path / "single")
    b, _, sb = read_weights(tmp_path / "ddp")
    assert sa == sb == 3
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
    assert len(list((tmp_path / "ddp").glob("log.jsonl"))) == 1  # rank 0 writes alone
