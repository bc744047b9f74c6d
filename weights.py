"""Checkpoint files on disk: finding them, reading them lazily, strict loading, atomic saving.

unet.py, vae.py and clip.py each name their modules after one checkpoint layout; this file holds what
they share: where the weights live in a diffusers folder (plain, fp16 variant, sharded), a lazy view of
safetensors files (memory-mapped, one tensor at a time), a strict key-for-key load into a model built on
the meta device, and writing safetensors atomically so a crash never leaves a half-written file.
"""
import errno
import glob
import hashlib
import json
import os
from typing import Callable, Dict, Iterable, Mapping, Union

import torch
from safetensors import safe_open
from safetensors.torch import save_file

import kernels


class CheckpointError(Exception):
    """A problem with a user's checkpoint, worded as one line the user can act on."""


# ----------------------------------------------------------------------------------------------------
# Finding files


def find_weights(folder: str, stem: str = "diffusion_pytorch_model") -> list:
    """The safetensors files of one diffusers component: plain, `.fp16` variant, or sharded by an index."""
    for index in (f"{stem}.safetensors.index.json", f"{stem}.safetensors.index.fp16.json"):
        p = os.path.join(folder, index)
        if os.path.isfile(p):
            with open(p) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            files = [os.path.join(folder, s) for s in shards]
            for s in files:
                if not os.path.isfile(s):
                    raise CheckpointError(f"{p} names shard {os.path.basename(s)}, which is missing")
            return files
    for name in (f"{stem}.safetensors", f"{stem}.fp16.safetensors"):
        p = os.path.join(folder, name)
        if os.path.isfile(p):
            return [p]
    raise CheckpointError(f"no {stem}.safetensors (or .fp16 / sharded variant) in {folder}")


def component(path: str, sub: str):
    """Resolve a user path to ('file', path) for a single-file checkpoint or ('folder', dir) for `sub`.

    path may be a diffusers model root (holding `sub/`), the `sub/` folder itself, or one .safetensors file.
    """
    if not os.path.exists(path):
        raise CheckpointError(f"model path does not exist: {path}")
    if os.path.isfile(path):
        if not path.endswith(".safetensors"):
            raise CheckpointError(f"not a .safetensors file: {path}")
        return "file", path
    if os.path.isdir(os.path.join(path, sub)):
        return "folder", os.path.join(path, sub)
    if os.path.isfile(os.path.join(path, "config.json")):
        return "folder", path
    raise CheckpointError(f"{path} is neither a diffusers model folder (no {sub}/) nor a {sub} folder")


def read_json(path: str, default=None):
    """A JSON file; `default` when it does not exist (None: a missing file is an error too)."""
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        if default is not None:
            return default
        raise CheckpointError(f"cannot read {path}: no such file") from None
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None


def torch_file(path: str, what: str, mmap=False):
    """A PyTorch file of tensors (a checkpoint, a .pt / .pth head), read without running pickled code. Any failure
    is one CheckpointError line in our words: torch's own would advise loading it unsafely."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise CheckpointError(f"cannot read {what} {path}: no such file") from None
    except Exception as e:  # not a torch file, cut short, or pickled objects besides tensors
        why = "it holds pickled objects besides tensors, which are not loaded" if "Unsupported global" in str(e) \
            else "not a PyTorch file of tensors"  # (torch's own words would advise an unsafe load)
        raise CheckpointError(f"cannot read {what} {path}: {why}") from None


def read_config(folder: str) -> dict:
    """config.json of a diffusers/transformers component folder."""
    return read_json(os.path.join(folder, "config.json"))


def diffusers_folder(folder: str, class_name: str):
    """(config, checkpoint) of a diffusers component folder that must hold a class_name model."""
    config = read_config(folder)
    found = config.get("_class_name", class_name)
    if found != class_name:
        raise CheckpointError(f"{folder} holds {found}, not {class_name}")
    return config, Checkpoint(find_weights(folder))


def special_tokens(folder: str, special: dict) -> dict:
    """A tokenizer folder's special tokens (special_tokens_map.json, then tokenizer_config.json, which wins as in
    transformers), over the defaults in special."""
    special = dict(special)
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        cfg = read_json(os.path.join(folder, name), {})
        for k in special:
            v = cfg.get(k)
            special[k] = (v.get("content") if isinstance(v, dict) else v) or special[k]
    return special


# ----------------------------------------------------------------------------------------------------
# Reading lazily


class Checkpoint:
    """Read-only view of one or more safetensors files: names, shapes, and tensors loaded on demand."""

    def __init__(self, files: Union[str, Iterable[str]]):
        files = [files] if isinstance(files, str) else list(files)
        self.files, self._where, self.metadata = files, {}, {}
        self._handles = []
        for p in files:
            try:
                self._check_size(p)
                h = safe_open(p, framework="pt", device="cpu")
            except CheckpointError:
                raise
            except Exception as e:  # not a safetensors file, corrupt header, unreadable, ...
                why = (str(e).splitlines() or [type(e).__name__])[0]
                raise CheckpointError(f"cannot read safetensors file {p}: {why}") from None
            self._handles.append(h)
            self.metadata.update(h.metadata() or {})
            for k in h.keys():
                self._where[k] = h

    @staticmethod
    def _check_size(p):
        """Catch truncated files up front (safetensors only notices when the missing tensor is read)."""
        size = os.path.getsize(p)
        with open(p, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n > size - 8:
                raise CheckpointError(f"not a safetensors file (or truncated header): {p}")
            header = json.loads(f.read(n))
        data_end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if size < 8 + n + data_end:
            raise CheckpointError(f"safetensors file is truncated: {p}")

    def keys(self):
        return self._where.keys()

    def __contains__(self, k):
        return k in self._where

    def __len__(self):
        return len(self._where)

    def shape(self, k) -> tuple:
        return tuple(self._where[k].get_slice(k).get_shape())

    def __getitem__(self, k) -> torch.Tensor:
        return self._where[k].get_tensor(k)


# ----------------------------------------------------------------------------------------------------
# Strict loading


Source = Union[torch.Tensor, Callable[[], torch.Tensor]]


def _names(keys, limit=8) -> str:
    keys = sorted(keys)
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def load_module(module: torch.nn.Module, sources: Mapping[str, Source], dtype, device, what: str, quantize=None):
    """Strict key-for-key load of a (meta-built) module; each tensor goes straight to dtype/device (dtype: one
    for all, or a dict name -> dtype).

    sources maps the module's own state_dict names to tensors or to thunks that produce them, so a
    converted layout is read one tensor at a time and never held twice in memory. quantize ("fp8", "int8", "nf4"):
    every Linear whose weight the format can store becomes a frozen kernels.QuantLinear, its weight quantized as it
    is read (one layer in dtype at a time: the model never exists whole in dtype).
    """
    expected = module.state_dict()
    missing = expected.keys() - sources.keys()
    unexpected = sources.keys() - expected.keys()
    if missing or unexpected:
        msg = [f"{what}: checkpoint does not match the model"]
        if missing:
            msg.append(f"missing keys: {_names(missing)}")
        if unexpected:
            msg.append(f"unexpected keys: {_names(unexpected)}")
        raise CheckpointError("; ".join(msg))
    linears = {} if quantize is None else {
        f"{n}.weight": n for n, m in module.named_modules()
        if type(m) is torch.nn.Linear and kernels.quantizable(quantize, m.weight.shape)}
    state, quantized = {}, {}
    for name, ref in expected.items():
        src = sources[name]
        t = src() if callable(src) else src
        if tuple(t.shape) != tuple(ref.shape):
            raise CheckpointError(f"{what}: shape mismatch for {name}: checkpoint {tuple(t.shape)}, "
                                  f"model {tuple(ref.shape)}")
        want = dtype[name] if isinstance(dtype, dict) else dtype
        t = t.to(device=device, dtype=want if t.is_floating_point() else t.dtype)
        if name in linears:
            quantized[linears[name]] = kernels.quantize(t, quantize)  # (t, this layer in dtype, is freed here)
        elif quantize and t.device.type == "cpu":  # safetensors hands out views of the whole mapped file: one kept
            state[name] = t.clone()  # view would keep every weight's pages resident beside their codes
        else:
            state[name] = t
    for layer, q in quantized.items():  # the Linears become QuantLinears, their biases kept as they are
        parent, _, child = layer.rpartition(".")
        setattr(module.get_submodule(parent), child, kernels.QuantLinear(q, state.get(f"{layer}.bias")))
    module.load_state_dict(state, strict=True, assign=True)
    for name, b in module.named_buffers():
        if b.is_meta:
            raise CheckpointError(f"{what}: buffer {name} was not loaded")
    return module


def layer_dtypes(module: torch.nn.Module, dtype, other=None) -> dict:
    """name -> dtype for load_module: the Linear and Conv2d weights and biases in dtype, every other tensor (norm
    scales, position tables) in other (None: dtype too). Autocast runs those in fp32 anyway, so a frozen copy with
    them in fp32 computes bit for bit what the fp32 policy computes under autocast."""
    layers = (torch.nn.Linear, torch.nn.Conv2d)
    inside = {f"{n}.{p}" for n, m in module.named_modules() if isinstance(m, layers) for p, _ in m.named_parameters(
        recurse=False)}
    return {k: dtype if k in inside or other is None else other for k in module.state_dict()}


def fingerprint(path: str) -> dict:
    """What a model path holds, wherever it lies: a digest of its configs and tokenizer files, and of each weight
    file's size, header and first and last 64 KiB of data (two fine-tunes differ there; reading is instant).
    Moving or copying the files keeps the digest; any other weights change it."""
    if os.path.isfile(path):
        files, root = [path], None
    else:
        files = sorted(f for f in glob.glob(os.path.join(path, "**", "*"), recursive=True)
                       if f.endswith((".json", ".safetensors", ".txt")) and os.path.isfile(f))
        root = path
    h, size = hashlib.sha256(), 0
    for f in files:
        n = os.path.getsize(f)
        size += n
        h.update(f"{os.path.relpath(f, root) if root else ''}:{n}\n".encode())
        with open(f, "rb") as fh:
            if not f.endswith(".safetensors"):
                h.update(fh.read())
                continue
            header = int.from_bytes(fh.read(8), "little")
            h.update(fh.read(min(header, n)))
            h.update(fh.read(1 << 16))
            fh.seek(max(8 + header, n - (1 << 16)))
            h.update(fh.read())
    return {"digest": h.hexdigest()[:16], "files": len(files), "bytes": size, "path": os.path.abspath(path)}


# ----------------------------------------------------------------------------------------------------
# Other layouts: each model writes one table, from its own module names to the other layout's, with loops


def rename(key: str, table: Mapping[str, str]) -> str:
    """key with its longest dotted prefix that is in table replaced (the whole key counts too; others pass)."""
    parts = key.split(".")
    for i in range(len(parts), 0, -1):
        p = ".".join(parts[:i])
        if p in table:
            return table[p] + key[len(p):]
    return key


def renamed(ckpt: "Checkpoint", names, prefix: str, table: Mapping[str, str], what: str, strict=False) -> dict:
    """Our name -> the name of its tensor in ckpt (prefix + rename(name, table)), for a model whose checkpoint is in
    another layout. Names the file's missing keys; strict: also its keys under prefix that no name of ours maps to."""
    src = {n: prefix + rename(n, table) for n in names}
    missing = list(dict.fromkeys(s for s in src.values() if s not in ckpt))
    if missing:
        more = f" (+{len(missing) - 8} more)" if len(missing) > 8 else ""
        raise CheckpointError(f"{what} keys missing: {', '.join(missing[:8])}{more}")
    unexpected = {k for k in ckpt.keys() if k.startswith(prefix)} - set(src.values()) if strict else set()
    if unexpected:
        raise CheckpointError(f"{what}: unexpected keys: {_names(unexpected)}")
    return src


def fused_sources(ckpt: "Checkpoint", plan: Mapping[str, tuple], prefix: str, width: int, what: str,
                  ignored=()) -> dict:
    """Our name -> a thunk reading its tensor from a single file that fuses some of our tensors into one (FLUX's and
    Z-Image's qkv): plan maps each name to (its key there, the rows it takes or None: (start, stop) pairs in units of
    width, copied out and concatenated, never a view). Strict: the file's missing keys and its keys under prefix that
    no name takes (but the ignored ones) are named."""
    def read(key, rows):
        t = ckpt[key]
        return t if rows is None else torch.cat([t[a * width:b * width] for a, b in rows])  # a copy, not a view
    used = {prefix + key for key, _ in plan.values()}
    missing = sorted(used - set(ckpt.keys()))
    if missing:
        raise CheckpointError(f"{what}: keys missing: {', '.join(missing[:8])}")
    unexpected = sorted(k for k in ckpt.keys() if k.startswith(prefix) and k not in used
                        and k[len(prefix):] not in ignored)
    if unexpected:
        raise CheckpointError(f"{what}: unexpected keys: {', '.join(unexpected[:8])}")
    return {n: (lambda p=p: read(prefix + p[0], p[1])) for n, p in plan.items()}


# ----------------------------------------------------------------------------------------------------
# Saving


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_umask()  # what open() gives a new file here; safetensors' writer makes its files 0600


class WriteError(OSError):
    """A file that could not be written (disk full, no permission), worded as one line that names it."""


def _cause(e: BaseException, path: str) -> str:
    """Why a write failed, in a few words: a full disk says so, whatever library raised it."""
    try:
        free = os.statvfs(os.path.dirname(os.path.abspath(path)) or ".")
        full = free.f_bavail * free.f_frsize < (1 << 20)
    except OSError:
        full = False
    said = str(e).lower()
    if getattr(e, "errno", None) == errno.ENOSPC or full or "no space left" in said or "os error 28" in said:
        return "no space left on device"
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def atomic(path: str, write: Callable[[str], None], suffix: str = ""):
    """write(tmp) to a temporary name beside path, then rename it over path: path holds its old bytes or the new
    ones, never a part. On any failure, Ctrl-C included, the temporary file is removed; a failure to write is one
    WriteError line naming path and the cause (a full disk, a missing folder, ...); a ValueError of write's own (bad
    content, not a bad disk) goes on as it is."""
    tmp = f"{path}.tmp{os.getpid()}{suffix}"
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        cause = _cause(e, path) if isinstance(e, Exception) else None  # while the disk is still as full as it was
        if os.path.exists(tmp):
            os.remove(tmp)
        if cause is not None and not isinstance(e, WriteError) and \
                not (isinstance(e, ValueError) and cause != "no space left on device"):
            raise WriteError(f"cannot write {path}: {cause}") from None
        raise


def _canonical_header(path: str):
    """Rewrite a safetensors file's JSON header in sorted key order (same length): the library writes its
    metadata from a hash map, so identical tensors could otherwise give different bytes run to run."""
    with open(path, "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        raw = f.read(n)
        text = json.dumps(json.loads(raw), sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) <= n:
            f.seek(8)
            f.write(text + b" " * (n - len(text)))


def save_safetensors(tensors: Dict[str, torch.Tensor], path: str, metadata: dict = None):
    """Write a safetensors file atomically (weights.atomic), the same bytes for the same tensors and metadata."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def write(tmp):
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        _canonical_header(tmp)
        os.chmod(tmp, FILE_MODE)
    atomic(path, write)


def save_diffusers(state: Dict[str, torch.Tensor], config: dict, folder: str, metadata: dict = None):
    """folder/ config.json + diffusion_pytorch_model.safetensors: a diffusers component folder."""
    os.makedirs(folder, exist_ok=True)
    save_safetensors(state, os.path.join(folder, "diffusion_pytorch_model.safetensors"), metadata)
    save_json(config, os.path.join(folder, "config.json"))


def save_json(obj, path: str):
    """Write JSON atomically (same reason as save_safetensors)."""
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
    atomic(path, write)


# JSON lines: a run's log (metrics.jsonl), an online run's pairs.jsonl, the demo's pairs


def save_jsonl(rows, path: str):
    """Write one JSON object per line, atomically (a file rewritten: the old lines or the new ones, never a part)."""
    def write(tmp):
        with open(tmp, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    atomic(path, write)


def append_jsonl(rows, path: str):
    """Append one JSON object per line (a crash may cut the last line short: load_jsonl drops it); a failure to
    write is one WriteError line naming path."""
    try:
        with open(path, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    except OSError as e:
        raise WriteError(f"cannot write {path}: {_cause(e, path)}") from None


def load_jsonl(path: str, log=print) -> list:
    """The objects of a JSON-lines file ([] when it does not exist). A last line cut short (a crash during an append)
    is dropped with a warning; a bad line elsewhere is an error naming it."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        lines = f.read().splitlines()
    records = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if n < len(lines):
                raise ValueError(f"{path}:{n}: not a JSON line ({e})") from None
            log(f"warning: {path}:{n}: dropped a last line cut short by a crash ({line[:40]!r})")
    return records
