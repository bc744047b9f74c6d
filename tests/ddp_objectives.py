"""Run under torchrun by tests/test_objectives.py: train each objective named on the command line in turn, in one
process group (2 ranks x 1 pair), into OUT/two_<loss>, with beta 0.02 x the loss's default.

    torchrun --nproc_per_node 2 tests/ddp_objectives.py OUT LOSS [LOSS ...] -- DPO.PY FLAGS
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root

import dpo  # noqa: E402

if __name__ == "__main__":
    split = sys.argv.index("--")
    out, losses, flags = sys.argv[1], sys.argv[2:split], sys.argv[split + 1:]
    for loss in losses:
        beta = str(dpo.BETA[loss] * 0.02)
        dpo.main([*flags, "--loss", loss, "--beta", beta, "--batch_size", "1", "--out_dir", f"{out}/two_{loss}"])
