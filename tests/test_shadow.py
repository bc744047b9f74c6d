"""bench/shadow.py: the byte counter counts each storage once, rounded as CUDA's allocator rounds it (the plan's shadow
tensors against real ones: test_plan.py)."""
import torch

from bench import shadow


def test_counter_counts_each_storage_once_rounded_as_cuda():
    c = shadow.Counter(shadow=False)
    with c:
        first = c.mark("a")
        x = torch.empty(10)  # 40 bytes: one 512-byte block
        v = x.view(2, 5)  # a view: no new storage
        y = x + 1  # 512
        z = torch.empty(1000, dtype=torch.bfloat16)  # 2000 bytes -> 2048
        del y
        w = torch.empty(0)  # nothing allocated
        last = c.mark("end")
    assert [c.size[e] for e in c.events if e >= 0] == [512, 512, 2048, 0]
    peak, phase, live = c.replay(first, last)
    assert peak == 512 + 512 + 2048 and phase == "a" and live["activations"] == peak
    assert c.serial(v) == c.serial(x) and c.serial(z) is not None and w.numel() == 0
