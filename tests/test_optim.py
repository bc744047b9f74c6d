"""optim.py: Adafactor (the official SDXL run's settings) step for step against transformers'."""
import torch

import optim


def test_adafactor_matches_transformers():
    from transformers.optimization import Adafactor as HF
    g = torch.Generator().manual_seed(0)
    shapes = [(6, 5), (4, 3, 3, 3), (7,)]
    p1 = [torch.randn(s, generator=g).requires_grad_(True) for s in shapes]
    p2 = [p.detach().clone().requires_grad_(True) for p in p1]
    o1 = optim.Adafactor(p1, lr=1e-2, weight_decay=1e-2)
    o2 = HF(p2, lr=1e-2, weight_decay=1e-2, clip_threshold=1.0, scale_parameter=False, relative_step=False,
            warmup_init=False)
    for _ in range(4):
        grads = [torch.randn(s, generator=g) for s in shapes]
        for ps, o in ((p1, o1), (p2, o2)):
            for p, gr in zip(ps, grads):
                p.grad = gr.clone()
            o.step()
    for a, b in zip(p1, p2):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)
