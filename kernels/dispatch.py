"""Pick Triton kernels or PyTorch references, per call, from the DPO_KERNELS env var (or, for bench/plan.py, each
kernel's allocation model); count FLOPs."""
import contextlib
import contextvars
import os

import torch

H100_BF16_PEAK = 989e12  # dense bf16 FLOP/s of one H100 SXM, the MFU denominator


_PLANNING = contextvars.ContextVar("kernels_planning", default=False)


@contextlib.contextmanager
def allocation_models():
    """Inside, kernels.attention and kernels.dpo_loss run their allocation models (each kernel file's own: the
    tensors its launchers allocate, made empty, and no compute) on any device: bench/plan.py counts the CUDA step's
    memory on CPU shadow tensors with them. use_triton says True meanwhile, so callers take the kernels' path."""
    token = _PLANNING.set(True)
    try:
        yield
    finally:
        _PLANNING.reset(token)


def planning() -> bool:
    """True inside allocation_models()."""
    return _PLANNING.get()


def use_triton(t: torch.Tensor) -> bool:
    """True if this call should run the Triton kernel (read at call time so tests can monkeypatch)."""
    if planning():
        return True
    mode = os.environ.get("DPO_KERNELS", "").strip().lower()
    if mode not in ("", "auto", "triton", "torch"):
        raise ValueError(f"DPO_KERNELS must be 'triton', 'torch' or unset, got {mode!r}")
    if mode == "torch" or (mode != "triton" and not t.is_cuda):
        return False
    if not t.is_cuda:
        _check_interpreter()
    return True


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (no autotuning, no do_bench there)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _check_interpreter():
    """CPU tensors need the interpreter, and Triton fixes that choice when triton.language is imported."""
    from triton.language import standard
    from triton.runtime.interpreter import InterpretedFunction
    if not interpreting() or not isinstance(standard.zeros, InterpretedFunction):
        raise RuntimeError("Triton kernels on CPU tensors need TRITON_INTERPRET=1 set before triton is first "
                           "imported (diffusers and torch._dynamo import it), or use DPO_KERNELS=torch")


@contextlib.contextmanager
def references():
    """Run the PyTorch references inside, e.g. so that torch's FlopCounterMode can count what the kernels compute."""
    old = os.environ.get("DPO_KERNELS")
    os.environ["DPO_KERNELS"] = "torch"
    try:
        yield
    finally:
        os.environ.pop("DPO_KERNELS")
        if old is not None:
            os.environ["DPO_KERNELS"] = old


def flops(fn, *args) -> int:
    """FLOPs of fn(*args) without autograd, counted op by op by torch with the PyTorch references in place of the
    kernels (FlopCounterMode cannot see into a Triton kernel)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    with torch.no_grad(), references(), FlopCounterMode(display=False) as counter:
        fn(*args)
    return counter.get_total_flops()
