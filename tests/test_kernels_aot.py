"""The compiled (not interpreted) kernels build for an H100 (sm_90), checked on a machine without a GPU.

kernels/aot.py compiles each kernel x autotune config with Triton's bundled ptxas, specialised
exactly as the JIT would at the real call; the interpreter tests cannot catch a kernel that fails
to compile, overflows shared memory or spills its tiles out of registers.
"""
import csv
import importlib.util
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _has_ptxas():
    if importlib.util.find_spec("triton.backends.nvidia") is None:
        return False
    import triton
    return os.path.exists(triton.knobs.nvidia.ptxas.path) and os.path.exists(triton.knobs.nvidia.cuobjdump.path)


@pytest.mark.skipif(not _has_ptxas(), reason="this Triton build has no CUDA backend / bundled ptxas")
def test_kernels_compile_for_sm90_without_spills(tmp_path):
    out = tmp_path / "aot.csv"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # aot.py compiles for real
    p = subprocess.run([sys.executable, os.path.join(ROOT, "kernels", "aot.py"), "--quick", "--csv", str(out)],
                       capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    rows = list(csv.DictReader(open(out)))
    groups = {}
    for r in rows:
        groups.setdefault((r["shape"], r["kernel"]), []).append(r)
    quick = ("sdxl self 64x64", "sd15 self 16x16", "sd3 joint 1024^2", "flux joint 1024^2")  # the flow models' too
    expected = {(s, k) for s in quick for k in ("fwd", "bwd_dkdv", "bwd_dq")}
    expected |= {("fixed", k) for k in ("bwd_preprocess", "dpo_sse", "dpo_grad")}
    expected |= {(s, f"qlinear_{k}_{fmt}") for s in ("flux qkv", "sdxl 640") for k in ("fwd", "dx")
                 for fmt in ("fp8", "int8", "nf4")}  # the quantized linear at a FLUX.1 and an SDXL shape
    assert set(groups) == expected
    for key, rs in groups.items():  # the autotuner always has a config that fits and keeps tiles in registers
        assert any(r["fits"] == "True" and r["spill_bytes"] == "0" for r in rs), key
    # at SDXL's head dim every candidate compiles and fits (errors would show as empty regs + an error)
    sdxl = [r for r in rows if r["shape"] == "sdxl self 64x64"]
    assert len(sdxl) == 24 and all(r["fits"] == "True" and not r["error"] for r in sdxl), sdxl
    assert all(int(r["regs"]) <= 255 and int(r["shared"]) <= 232448 for r in sdxl)
    # the quantized linear: every candidate compiles and fits (nf4 keeps 3 of the 4 configs of each kernel)
    qlinear = [r for r in rows if r["kernel"].startswith("qlinear_")]
    assert len(qlinear) == 2 * (3 * 8 - 2) and all(r["fits"] == "True" and not r["error"] for r in qlinear)
    # the memory-bound kernels are simple enough that they must never spill
    assert all(r["spill_bytes"] == "0" for r in rows if r["shape"] == "fixed")
