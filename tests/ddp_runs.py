"""Run under torchrun by the tests: several dpo.py runs in turn, in one process group (so the workers start once).

    torchrun --nproc_per_node 2 tests/ddp_runs.py COMMON FLAGS :: RUN 1 FLAGS :: RUN 2 FLAGS ...
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root

import dpo  # noqa: E402

if __name__ == "__main__":
    parts, cur = [], []
    for a in sys.argv[1:] + ["::"]:
        if a == "::":
            parts.append(cur)
            cur = []
        else:
            cur.append(a)
    for flags in parts[1:]:
        dpo.main(parts[0] + flags)
