"""Counting a step's memory without running it: shadow tensors and a byte counter (bench/plan.py plans with them).

A TorchDispatchMode (Counter) makes every tensor made under it a Shadow: a CPU tensor to autograd and autocast, held
as a meta tensor, so every op runs on torch's meta kernels (shapes, dtypes, strides; no data, no compute). The
Counter counts the bytes of each storage while it lives, once (views share it), rounded up to 512 bytes as the CUDA
caching allocator rounds what torch.cuda.max_memory_allocated counts, on a timeline of made / freed events and
named phases, whose peaks replay() reads. With shadow=False it counts real CPU tensors instead (to check it).
"""
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROUND = 512  # the CUDA caching allocator's block size: every allocation it counts is a multiple of it
KINDS = ("weights", "grads", "optimizer", "reference", "encoders", "casts", "activations")  # what a storage holds
SHAPES = {}  # shadow ops: (op, its inputs' shapes, strides, dtypes) -> its outputs' (Counter.run_shadow)


def allocated(nbytes):
    """What the CUDA caching allocator counts for a request of nbytes (an empty tensor allocates nothing)."""
    return -(-nbytes // ROUND) * ROUND


def apply(fn, x):
    """fn on every leaf of x (nested lists, tuples, dicts): torch's pytree, the few containers ops take, faster."""
    if isinstance(x, (list, tuple)) and not isinstance(x, torch.Size):
        return type(x)(apply(fn, a) for a in x)
    if isinstance(x, dict):
        return {k: apply(fn, v) for k, v in x.items()}
    return fn(x)


def leaves(x):
    """The leaves of x, as apply visits them."""
    out = []
    apply(out.append, x)
    return out


class Like:
    """A remembered output of an op: its shape, strides and dtype."""

    def __init__(self, t):
        self.shape, self.stride, self.dtype = t.shape, t.stride(), t.dtype


class Shadow(torch.Tensor):
    """A CPU tensor as autograd and autocast see it, held as a meta tensor (shape, dtype, storage size): no data."""

    @staticmethod
    def __new__(cls, meta):
        t = torch.Tensor._make_wrapper_subclass(cls, meta.shape, strides=meta.stride(), dtype=meta.dtype, device=CPU,
                                                storage_offset=meta.storage_offset(), layout=meta.layout)
        t.meta = meta
        return t

    __torch_function__ = torch._C._disabled_torch_function_impl

    def __repr__(self):
        return f"Shadow({tuple(self.shape)}, {self.dtype})"

    @property
    def data(self):
        return torch._C.TensorBase.data.__get__(self)

    @data.setter
    def data(self, new):  # Module.to(dtype) swaps parameters in place by `param.data = new`: the meta tensor too
        torch._C.TensorBase.data.__set__(self, new)
        self.meta = new.meta

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise RuntimeError(f"{func} on a shadow.Shadow tensor outside its Counter")


CPU, META = torch.device("cpu"), torch.device("meta")


class Counter(TorchDispatchMode):
    """The live bytes of every storage made under it, each storage once, on a timeline to read peaks from.

    shadow=True: every tensor made under it is a Shadow, and every op runs on the meta tensors inside (torch's meta
    kernels compute shapes, dtypes and strides only), so a step of the real SDXL takes seconds; shadow=False: real
    CPU tensors (to check the counts). Each storage gets a serial number and a kind (KINDS: "activations" until
    tagged as something else); the timeline records serial when it is made and ~serial when it dies; marks name
    the phases of the step."""

    def __init__(self, shadow=True):
        super().__init__()
        self.shadow = shadow
        self.live = {}  # storage address -> serial, while it lives
        self.size, self.kind = [], []  # serial -> bytes, kind
        self.events = []  # serial (made) or ~serial (freed), in order
        self.marks = []  # (index into events, phase name)
        self.refs = {}  # serial -> weakref of its storage, whose callback records the free
        self.casting = set()  # serials of the fp32 parameters whose bf16 copies autocast caches ("casts")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = self.run_shadow(func, args, kwargs) if self.shadow else func(*args, **kwargs)
        for t in leaves(out):
            if isinstance(t, torch.Tensor):
                self.add(t)
        if func is torch.ops.aten._to_copy.default and self.serial(args[0]) in self.casting:
            self.kind[self.serial(out)] = "casts"
        return out

    def run_shadow(self, func, args, kwargs):
        """func on the meta tensors inside the Shadows; an op that returns one of its inputs returns its Shadow.
        Ops that make new tensors are remembered by their inputs' shapes, strides and dtypes: the next call with
        the same ones makes empty meta tensors like the last outputs instead of running torch's (Python) meta code."""
        inputs = {}

        def down(a):
            if isinstance(a, Shadow):
                inputs[id(a.meta)] = a
                return a.meta
            if isinstance(a, torch.Tensor) and a.device.type == "cpu":  # a real constant (Qwen-Image's VAE's
                return a.to(META)  # per-channel latents_mean, kept outside its state dict): its shape
            return META if isinstance(a, torch.device) and a.type == "cpu" else a

        def up(t):
            if not isinstance(t, torch.Tensor):
                return t
            same = inputs.get(id(t))
            return Shadow(t) if same is None else same

        args, kwargs = apply(down, args), apply(down, kwargs)
        if kwargs.get("generator") is not None:  # random numbers on meta: none drawn, no generator needed
            kwargs["generator"] = None
        key = self.key(func, args, kwargs)
        like = SHAPES.get(key)
        if like is not None:
            out = apply(lambda m: torch.empty_strided(m.shape, m.stride, dtype=m.dtype, device=META), like)
        else:
            out = func(*args, **kwargs)
            if key is not None and key not in SHAPES:
                held = {m.untyped_storage()._cdata for m in leaves((args, kwargs)) if isinstance(m, torch.Tensor)}
                made = leaves(out)
                fresh = all(isinstance(t, torch.Tensor) and t.untyped_storage()._cdata not in held for t in made)
                SHAPES[key] = apply(Like, out) if fresh and made else None
        return apply(up, out)

    @staticmethod
    def key(func, args, kwargs):
        """What func's outputs depend on (None: the op writes its inputs, or says it returns a view of one, or takes
        arguments that do not hash); an op found to return a view anyway (aten._unsafe_view) is never remembered."""
        schema = func._schema
        if schema.is_mutable or any(r.alias_info is not None for r in schema.returns):
            return None

        def freeze(a):
            if isinstance(a, torch.Tensor):
                return ("tensor", tuple(a.shape), a.stride(), a.dtype)
            if isinstance(a, (list, tuple)):
                return tuple(freeze(x) for x in a)
            if isinstance(a, dict):
                return tuple((k, freeze(v)) for k, v in sorted(a.items()))
            hash(a)
            return a
        try:
            return func, freeze(args), freeze(kwargs)
        except TypeError:
            return None

    def add(self, t):
        """Count t's storage if it is new."""
        st = (t.meta if isinstance(t, Shadow) else t).untyped_storage()
        key = st._cdata
        if key in self.live:
            return
        serial = len(self.size)
        self.live[key] = serial
        self.size.append(allocated(st.nbytes()))
        self.kind.append("activations")
        self.events.append(serial)
        self.refs[serial] = weakref.ref(st, lambda _, key=key, serial=serial: self._free(key, serial))

    def _free(self, key, serial):
        if self.live.get(key) == serial:
            del self.live[key], self.refs[serial]
            self.events.append(~serial)

    def serial(self, t):
        """The serial of t's storage (None: not made under this counter)."""
        if isinstance(t, torch.Tensor):
            return self.live.get((t.meta if isinstance(t, Shadow) else t).untyped_storage()._cdata)
        return None

    def tag(self, tensors, kind):
        """Say what these tensors' storages hold (weights, grads, ...), for the breakdown and the parallel plans."""
        for t in tensors:
            s = self.serial(t)
            if s is not None:
                self.kind[s] = kind

    def mark(self, phase):
        """Everything from here on belongs to this phase; returns the mark's index, to replay a window from it."""
        self.marks.append((len(self.events), phase))
        return len(self.marks) - 1

    def replay(self, first, last, scale=None, extra=None):
        """The peak over the marks [first, last) of sum_kind scale[kind] * live bytes of that kind + extra[phase]:
        (peak bytes, phase at the peak, live bytes per kind at the peak)."""
        scale = {k: 1.0 for k in KINDS} | (scale or {})
        extra = extra or {}
        live = dict.fromkeys(KINDS, 0)
        for e in self.events[:self.marks[first][0]]:  # what is alive when the window opens
            s = e if e >= 0 else ~e
            live[self.kind[s]] += self.size[s] if e >= 0 else -self.size[s]
        best = (-1.0, None, None)
        for (begin, phase), (end, _) in zip(self.marks[first:last], self.marks[first + 1:last + 1]):
            value = sum(scale[k] * v for k, v in live.items()) + extra.get(phase, 0)
            if value > best[0]:
                best = (value, phase, dict(live))
            for e in self.events[begin:end]:
                s = e if e >= 0 else ~e
                if e >= 0:
                    live[self.kind[s]] += self.size[s]
                    value += scale[self.kind[s]] * self.size[s]
                    if value > best[0]:
                        best = (value, phase, dict(live))
                else:
                    live[self.kind[s]] -= self.size[s]
                    value -= scale[self.kind[s]] * self.size[s]
        return best


def materialize(module, dtype):
    """A meta-built module's parameters and buffers made anew under the Counter, in dtype (floating ones)."""
    for m in module.modules():
        for name, p in list(m.named_parameters(recurse=False)):
            want = dtype if p.is_floating_point() else p.dtype
            setattr(m, name, torch.nn.Parameter(torch.empty(p.shape, dtype=want), requires_grad=p.requires_grad))
        for name, b in list(m.named_buffers(recurse=False)):
            m._buffers[name] = torch.empty(b.shape, dtype=dtype if b.is_floating_point() else b.dtype)
    return module
