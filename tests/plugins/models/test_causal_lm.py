"""The patched causal-LM forward's fused loss under FSDP2 (``_causal_lm.fused_lm_head``), on CPU processes
over gloo."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.child_env import child_env


@pytest.mark.parametrize("layout, fused_calls", [("tail", 1), ("alone", 0)])
def test_fsdp_sharded_lm_head_gives_the_unpatched_loss_and_gradients(layout, fused_calls):
    """accelerate's layout (final norm and LM head one unit, gathered after its forward) takes the fused loss;
    a head sharded alone is called for its logits. Both match the unsharded, unpatched model."""
    worker = Path(__file__).parent / "fsdp_loss_worker.py"
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(worker), layout], env=child_env(OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    row = json.loads(done.stdout.strip().splitlines()[-1])
    assert row["head"] == "FSDPLinear"
    assert row["linear_cross_entropy_calls"] == fused_calls
    assert row["loss"] == pytest.approx(row["reference_loss"], rel=1e-5)
    assert row["grads"] == 29  # 28 LoRA matrices and the LM head
    assert row["max_grad_rel_err"] < 1e-4
