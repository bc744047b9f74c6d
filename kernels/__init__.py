"""Triton kernels for Diffusion-DPO: FlashAttention-2, a fused paired-noise DPO loss and a quantized linear.

Each kernel file holds the Triton kernel(s), the launcher, the autograd.Function, a plain-PyTorch
`*_ref` used as the correctness oracle, the kernel's allocation model (what bench/plan.py counts), and
a self-check (`python kernels/flash_attention.py`). `DPO_KERNELS` picks the path at call time:
  DPO_KERNELS=triton  -> Triton kernels (on a CPU-only machine they run in the Triton interpreter)
  DPO_KERNELS=torch   -> plain PyTorch (SDPA, dpo_loss_ref, qlinear_ref: dequantize, then F.linear)
  unset               -> Triton on CUDA tensors, PyTorch on CPU tensors
"""
import os

import torch

# Triton can only execute on CPU through its interpreter, and it decides interpreter-vs-compiled
# when a kernel is *defined* (@triton.jit), i.e. when the modules below are imported. So on a
# machine without CUDA, turn the interpreter on before they are imported (an explicit setting wins).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from .dispatch import H100_BF16_PEAK, allocation_models, flops, planning, references, use_triton  # noqa: E402
from .flash_attention import attention, attention_ref, sdpa  # noqa: E402
from .fused_dpo_loss import dpo_loss, dpo_loss_ref  # noqa: E402
from .quantized_linear import (FORMATS, Quantized, QuantLinear, qlinear, qlinear_ref, quantizable,  # noqa: E402
                               quantize, quantize_linears)

__all__ = ["FORMATS", "H100_BF16_PEAK", "QuantLinear", "Quantized", "allocation_models", "attention", "attention_ref",
           "dpo_loss", "dpo_loss_ref", "flops", "qlinear", "qlinear_ref", "quantizable", "quantize", "quantize_linears",
           "references", "sdpa", "use_triton"]
