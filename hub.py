"""Hub ids wherever a path is taken: ORG/NAME[@REVISION][/PATH] resolved to files in huggingface_hub's cache.

A local path always wins over an id of the same spelling. For an id, only the files a run reads are fetched: a
diffusers model's components without the safety checker, one set of weights per component (the plain safetensors,
else the fp16 variant; no .bin / .ckpt / flax / onnx twins, no single-file copy of the same model at the root; a
transformers folder's pytorch_model.bin only where it has no safetensors). A
file inside a repository is named by its path (ORG/NAME/HPS_v2.1_compressed.pt). A dataset's parquet shards are
listed, not fetched: data.py reads the row groups it reaches (stream).

Why huggingface_hub and not a hand-written client: it is the cache and the rules every hub tool shares (HF_HOME,
HF_HUB_CACHE, HF_HUB_OFFLINE, HF_TOKEN and `hf auth login`, gated repositories, resumable and xet downloads), so a
model a user already downloaded with diffusers is not downloaded again, and diffusers and transformers install it.
"""
import json
import os
import re

from weights import CheckpointError

ID = re.compile(r"^([A-Za-z0-9][\w.-]*/[\w.-]+?)(?:@([\w./-]+?))?(?:/(.+))?$")  # ORG/NAME[@REV][/PATH]
WEIGHTS = re.compile(r"^(?P<stem>.+?)(?:\.(?P<variant>[a-z]+\d+))?(?:-\d{5}-of-\d{5})?\.safetensors"
                     r"(?:\.index(?:\.(?P<ivariant>[a-z]+\d+))?\.json)?$")  # safetensors (.fp16, shards, index)
OTHER_WEIGHTS = (".bin", ".ckpt", ".pt", ".pth", ".msgpack", ".h5", ".onnx", ".onnx_data", ".pb", ".gguf", ".tflite",
                 ".ot", ".mlmodel", ".png", ".jpg", ".jpeg", ".gif", ".webp", ".mp4")  # read by no loader here
SKIP = ("safety_checker/",)  # components a diffusers model has that no run here reads


def parse(spec):
    """(repo, revision or None, path inside or "") of a hub id; None for what is not one (or is a local path)."""
    if not isinstance(spec, str) or os.path.exists(spec) or ".." in spec.split("/"):
        return None
    m = ID.match(spec)
    return (m.group(1), m.group(2), m.group(3) or "") if m else None


def choose(files, inside="", only=None, tokenizer=False):
    """The files of a repository listing that a run reads, under the folder `inside`: every small file, and of
    the weights one set per component (see the module's docstring); only: a diffusers model's components (folders
    ending in /) that are read: those model_index.json names, or one (a --unet_init); tokenizer: no weights."""
    pre = inside.rstrip("/") + "/" if inside else ""
    files = [f for f in files if f.startswith(pre) and not f[len(pre):].startswith(SKIP)]
    diffusers = pre + "model_index.json" in files
    if only is not None and diffusers:
        files = [f for f in files if "/" not in f[len(pre):] or f[len(pre):].startswith(tuple(only))]
    small, sets, bins = [], {}, {}
    for f in files:
        folder, name = os.path.split(f)
        m = WEIGHTS.match(name)
        if m is None:
            if not name.lower().endswith(OTHER_WEIGHTS):
                small.append(f)
            elif re.match(r"^pytorch_model(-\d{5}-of-\d{5})?\.bin$", name) and not tokenizer:
                bins.setdefault(folder, []).append(f)  # transformers 4's weights (PickScore_v1): read if alone
        elif not tokenizer and not (diffusers and folder == pre.rstrip("/")):  # (root: single-file twins)
            variant = m.group("variant") or m.group("ivariant")
            sets.setdefault((folder, m.group("stem")), {}).setdefault(variant, []).append(f)
    chosen = []
    for variants in sets.values():
        chosen += variants.get(None) or variants.get("fp16") or variants[sorted(variants, key=str)[0]]
    chosen += [f for folder, fs in bins.items() if not any(k[0] == folder for k in sets) for f in fs]
    return sorted(small + chosen)


def local(spec, flag, revision=None, repo_type="model", only=None, tokenizer=False):
    """spec itself when it is not a hub id (a local path, or nothing), else the local copy of its files: a folder
    (or the one file a PATH names) in the hub cache, downloaded once. Any problem: one CheckpointError line."""
    parsed = parse(spec)
    if parsed is None:
        return spec
    repo, rev, inside = parsed
    rev = rev or revision
    try:
        return _fetch(repo, rev, inside, repo_type, only, tokenizer)
    except CheckpointError as e:
        raise CheckpointError(f"{flag} {spec}: {e}") from None
    except Exception as e:
        raise CheckpointError(_why(e, flag, spec, repo_type)) from None


def resolve(args, flags, revision=None):
    """Each flag of args named in flags (flag -> local()'s keywords) that holds a hub id, replaced by its local copy;
    revision (--revision) pins the first flag's id (the model's), as diffusers' --revision does."""
    for k, (flag, how) in enumerate(flags.items()):
        value = getattr(args, flag, None)
        if isinstance(value, str):
            setattr(args, flag, local(value, "--" + flag, revision if k == 0 else None, **how))


def _fetch(repo, rev, inside, repo_type, only, tokenizer):
    """The local path of repo's files under inside: listed on the hub (or, offline, in the cache), then fetched."""
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download
    from huggingface_hub import errors
    offline, files, unreachable = _offline(), None, None
    if not offline:
        try:
            files = HfApi().list_repo_files(repo, repo_type=repo_type, revision=rev)
        except (errors.RepositoryNotFoundError, errors.RevisionNotFoundError):
            raise
        except Exception as e:  # the hub unreachable: what the cache holds, as every hub tool falls back
            offline, unreachable = True, e
    if files is None:  # offline: what the cache holds, as its listing of the commit says or as it lies on disk
        try:
            files = _cached_listing(repo, repo_type, rev)
        except Exception:
            if unreachable is None:
                raise
            why = str(unreachable).splitlines()[0] if str(unreachable) else type(unreachable).__name__
            raise CheckpointError(f"the hub cannot be reached ({why}) and its cache ({_cache()}) does not hold "
                                  "it") from None
    if inside and inside in files:  # one file
        return hf_hub_download(repo, inside, repo_type=repo_type, revision=rev)
    if inside and not any(f.startswith(inside.rstrip("/") + "/") for f in files):
        raise CheckpointError(f"the repository has no file or folder {inside}" + (f" at revision {rev}" if rev else ""))
    pre = inside.rstrip("/") + "/" if inside else ""
    if pre + "model_index.json" in files:  # a diffusers model: the components its index names, at most
        index = json.load(open(hf_hub_download(repo, pre + "model_index.json", repo_type=repo_type, revision=rev)))
        named = tuple(k + "/" for k, v in index.items() if isinstance(v, list))
        only = named if only is None else tuple(o for o in only if o in named)
    wanted = choose(files, inside, only, tokenizer)
    rest = [f[len(pre):] for f in wanted]
    singles = [f for f in rest if f.endswith(".safetensors") and "/" not in f]
    if repo_type == "model" and len(singles) > 1 and not {"config.json", "model_index.json"} & set(rest):
        raise CheckpointError(f"it holds {len(singles)} single files "
                              f"({', '.join(singles[:3])}): name one, e.g. {repo}/{pre}{singles[0]}")
    if repo_type == "dataset":  # the shards are read where they lie (online) or where the cache holds them
        wanted = [f for f in wanted if not f.endswith(".parquet")] if not offline else wanted
        if not offline:
            snapshot_download(repo, repo_type=repo_type, revision=rev, allow_patterns=wanted, local_files_only=offline)
            return "hf://datasets/" + repo + (f"@{rev}" if rev else "") + (f"/{inside}" if inside else "")
    folder = snapshot_download(repo, repo_type=repo_type, revision=rev, allow_patterns=wanted, local_files_only=offline)
    here = os.path.join(folder, inside) if inside else folder
    if repo_type == "model" and len(singles) == 1 and not {"config.json", "model_index.json"} & set(rest):
        return os.path.join(here, singles[0])  # a repository of one single-file checkpoint
    return here


def _offline():
    from huggingface_hub import constants
    return constants.HF_HUB_OFFLINE


def _cached_listing(repo, repo_type, rev):
    """The files of repo at rev in the hub cache: the listing cached with the download, else the snapshot's files."""
    from huggingface_hub import snapshot_download
    try:
        from huggingface_hub import get_cached_repo_tree
        tree = [f.path for f in get_cached_repo_tree(repo, repo_type=repo_type, revision=rev)]
    except Exception:
        tree = []
    if tree:
        return tree
    folder = snapshot_download(repo, repo_type=repo_type, revision=rev, local_files_only=True)
    return sorted(os.path.relpath(os.path.join(d, f), folder).replace(os.sep, "/")
                  for d, _, names in os.walk(folder) for f in names)


def _why(e, flag, spec, repo_type):
    """A hub failure as the one line the user acts on."""
    from huggingface_hub import errors
    kind = "dataset " if repo_type == "dataset" else ""
    fetch = f"hf download {parse(spec)[0]}" + (" --repo-type dataset" if repo_type == "dataset" else "")
    if isinstance(e, errors.RevisionNotFoundError):
        return f"{flag} {spec}: the hub {kind}repository has no such revision"
    if isinstance(e, errors.GatedRepoError):
        return f"{flag} {spec}: a gated repository: accept its terms on the hub, then log in (`hf auth login`)"
    if isinstance(e, errors.RepositoryNotFoundError):
        return (f"{flag} {spec}: no such local path, and no hub {kind}repository of that name (a private one needs "
                "`hf auth login` or HF_TOKEN)")
    if isinstance(e, (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled)):
        return (f"{flag} {spec}: no such local path, and the hub {kind}repository is not in the cache "
                f"({_cache()}) while offline (HF_HUB_OFFLINE): download it first with `{fetch}`")
    why = str(e).splitlines()[0] if str(e) else ""
    return f"{flag} {spec}: cannot fetch it from the hub ({type(e).__name__}: {why})"


def _cache():
    from huggingface_hub import constants
    return constants.HF_HUB_CACHE


def commit(path):
    """'ORG/NAME@COMMIT' of a path inside the hub cache, None for any other path (for fingerprints and messages)."""
    m = re.search(r"(?:models|datasets)--([^/]+?)--([^/]+)/snapshots/([0-9a-f]{40})", str(path).replace(os.sep, "/"))
    m2 = re.match(r"hf://datasets/([^/@]+/[^/@]+)(?:@([^/]+))?", str(path))
    if m:
        return f"{m.group(1)}/{m.group(2)}@{m.group(3)}"
    return f"{m2.group(1)}@{m2.group(2) or 'main'}" if m2 else None


# ----------------------------------------------------------------------------------------------------
# A dataset's shards where they lie: data.py opens them through these and reads the row groups it reaches.

REMOTE = "hf://"
_fs = []  # the one HfFileSystem of this process (tests put a stand-in here)


def filesystem():
    """huggingface_hub's fsspec filesystem: files of hf:// paths read by byte ranges, a block at a time."""
    if not _fs:
        from huggingface_hub import HfFileSystem
        _fs.append(HfFileSystem())
    return _fs[0]


def remote(path) -> bool:
    return isinstance(path, str) and path.startswith(REMOTE)


def find(path, suffix=".parquet"):
    """The files under a hf:// folder (or the file itself) ending in suffix, sorted."""
    fs = filesystem()
    if fs.isfile(path):
        return [path]
    return sorted(REMOTE + f.removeprefix(REMOTE) for f in fs.find(path) if f.endswith(suffix))


def open_file(path, block=1 << 20):
    """A read-only file object of a hf:// path: seeks and reads fetch the byte ranges asked for, nothing more."""
    return filesystem().open(path, "rb", block_size=block)


def size(path) -> int:
    return filesystem().size(path)
