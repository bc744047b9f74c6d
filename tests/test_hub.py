"""hub.py: hub ids wherever a path is taken, from huggingface_hub's cache (HF_HOME, HF_HUB_OFFLINE) as a user's
machine holds it; only the files a run reads; a local path wins; one line when the cache lacks the id; a hub
dataset's shards read by byte ranges, only the row groups the loader reaches."""
import hashlib
import io
import json
import os
import shutil

import pytest
import torch

import data
import dpo
import evaluate
import hub
import sample
import tiny

SDXL_REPO = """model_index.json sd_xl_base_1.0.safetensors sd_xl_base_1.0_0.9vae.safetensors README.md 01.png
scheduler/scheduler_config.json text_encoder/config.json text_encoder/model.safetensors
text_encoder/model.fp16.safetensors text_encoder/flax_model.msgpack text_encoder/openvino_model.bin
text_encoder/model.onnx text_encoder_2/config.json text_encoder_2/model.safetensors
text_encoder_2/model.fp16.safetensors
tokenizer/merges.txt tokenizer/vocab.json tokenizer/special_tokens_map.json tokenizer/tokenizer_config.json
unet/config.json unet/diffusion_pytorch_model.safetensors unet/diffusion_pytorch_model.fp16.safetensors
unet/diffusion_flax_model.msgpack unet/model.onnx unet/model.onnx_data vae/config.json
vae/diffusion_pytorch_model.safetensors vae/diffusion_pytorch_model.fp16.safetensors vae_1_0/config.json
vae_1_0/diffusion_pytorch_model.safetensors safety_checker/model.safetensors safety_checker/config.json""".split()
FLUX_REPO = """model_index.json flux1-dev.safetensors ae.safetensors transformer/config.json
transformer/diffusion_pytorch_model-00001-of-00003.safetensors
transformer/diffusion_pytorch_model-00002-of-00003.safetensors
transformer/diffusion_pytorch_model-00003-of-00003.safetensors
transformer/diffusion_pytorch_model.safetensors.index.json
text_encoder_2/model-00001-of-00002.safetensors text_encoder_2/model-00002-of-00002.safetensors
text_encoder_2/model.safetensors.index.json text_encoder_2/config.json vae/config.json
vae/diffusion_pytorch_model.safetensors""".split()


def test_only_the_files_a_run_reads():
    """One set of weights per component (plain, else fp16), no .bin / flax / onnx twins, no safety checker, no
    single-file copy at the root of a diffusers model, only the components model_index.json names."""
    comps = ("scheduler/", "text_encoder/", "text_encoder_2/", "tokenizer/", "unet/", "vae/")
    got = hub.choose(SDXL_REPO, only=comps)
    assert got == sorted(["README.md", "model_index.json", "scheduler/scheduler_config.json",
                          "text_encoder/config.json", "text_encoder/model.safetensors", "text_encoder_2/config.json",
                          "text_encoder_2/model.safetensors", "tokenizer/merges.txt", "tokenizer/vocab.json",
                          "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json", "unet/config.json",
                          "unet/diffusion_pytorch_model.safetensors", "vae/config.json",
                          "vae/diffusion_pytorch_model.safetensors"])
    denoiser = hub.choose(SDXL_REPO, only=("unet/",))
    assert [f for f in denoiser if "/" in f] == ["unet/config.json", "unet/diffusion_pytorch_model.safetensors"]
    assert not any(f.endswith(".safetensors") for f in hub.choose(SDXL_REPO, tokenizer=True))
    flux = hub.choose(FLUX_REPO)
    assert "flux1-dev.safetensors" not in flux and "ae.safetensors" not in flux
    assert sum(f.startswith("transformer/diffusion_pytorch_model") for f in flux) == 4  # 3 shards + index
    only_fp16 = ["unet/config.json", "unet/diffusion_pytorch_model.fp16.safetensors"]
    assert hub.choose(only_fp16) == only_fp16
    pickscore = ["config.json", "pytorch_model.bin", "preprocessor_config.json", "training_args.bin"]  # PickScore_v1
    assert hub.choose(pickscore) == ["config.json", "preprocessor_config.json", "pytorch_model.bin"]
    assert hub.choose(pickscore + ["model.safetensors"]) == ["config.json", "model.safetensors",
                                                              "preprocessor_config.json"]
    for spec, parsed in [("org/name", ("org/name", None, "")), ("org/name@abc123/unet", ("org/name", "abc123", "unet")),
                         ("xswu/HPSv2/HPS_v2.1_compressed.pt", ("xswu/HPSv2", None, "HPS_v2.1_compressed.pt")),
                         ("pickapic_v2/", None), ("a/b/../c", None), ("runs", None), ("hf://datasets/a/b", None)]:
        assert hub.parse(spec) == parsed


def put(home, repo, src, repo_type="model", branch="main", commit=None):
    """src (a folder) into the hub cache under HF_HOME=home, laid out as huggingface_hub lays it (refs/BRANCH -> the
    commit, snapshots/COMMIT/...); returns the commit."""
    commit = commit or hashlib.sha1(f"{repo}{branch}".encode()).hexdigest()
    root = os.path.join(home, "hub", ("datasets--" if repo_type == "dataset" else "models--") + repo.replace("/", "--"))
    os.makedirs(os.path.join(root, "refs"), exist_ok=True)
    with open(os.path.join(root, "refs", branch), "w") as f:
        f.write(commit)
    shutil.copytree(src, os.path.join(root, "snapshots", commit))
    return commit


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """HF_HOME in tmp_path and HF_HUB_OFFLINE=1 for this process (huggingface_hub reads them at import: set there)."""
    from huggingface_hub import constants
    home = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return str(home)


def test_train_sample_and_evaluate_by_id(offline, tmp_path, sdxl_dir, one_thread, capsys):
    """A tiny model and a parquet preference set in the cache, offline: the same run by id as by path."""
    shards = tmp_path / "set" / "data"
    shards.mkdir(parents=True)
    tiny.write_parquet(shards / "train-00000-of-00001.parquet", n=12)
    put(offline, "org/tiny-sdxl", sdxl_dir)
    put(offline, "org/pairs", tmp_path / "set", "dataset")
    by_path = tiny.run(tmp_path / "path", sdxl_dir, str(shards.parent), steps=2)
    by_id = tiny.run(tmp_path / "id", "org/tiny-sdxl", "org/pairs", steps=2)
    assert [m["loss"] for m in by_id] == [m["loss"] for m in by_path]
    sample.main(["--model", "org/tiny-sdxl", "--unet", str(tmp_path / "id"), "--prompt", "a cat", "--steps", "2",
                 "--height", "32", "--width", "32", "--out", str(tmp_path / "samples")])
    assert os.listdir(tmp_path / "samples")
    evaluate.main(["--model", "org/tiny-sdxl", "--unet", str(tmp_path / "id"), "--eval_pairs", "org/pairs",
                   "--split", "train", "--eval_k", "1", "--out", str(tmp_path / "eval")])
    assert os.path.isfile(tmp_path / "eval" / "eval.json")


def test_an_id_not_in_the_cache_offline_is_one_line(offline, tmp_path, sdxl_dir, capsys):
    put(offline, "org/tiny-sdxl", sdxl_dir)
    err = tiny.cli_error(dpo.main, ["--model", "org/missing", "--data", "org/pairs", "--out_dir", str(tmp_path / "r")],
                         capsys)
    assert "--model org/missing" in err and "not in the cache" in err and "hf download org/missing" in err
    err = tiny.cli_error(dpo.main, ["--model", "org/tiny-sdxl", "--data", "org/pairs", "--out_dir",
                                    str(tmp_path / "r")], capsys)
    assert "--data org/pairs" in err and "hf download org/pairs --repo-type dataset" in err
    assert not os.path.exists(tmp_path / "r")


def test_a_local_path_wins_and_revision_pins(offline, tmp_path, sdxl_dir, sd15_dir, monkeypatch):
    """A folder spelled as an id is read as the folder; --revision and @REV pick another commit of the cache."""
    main = put(offline, "org/model", sdxl_dir)
    old = put(offline, "org/model", sd15_dir, branch="v1")
    assert hub.local("org/model", "--model").endswith(main) and hub.commit(hub.local("org/model", "--model")) == \
        f"org/model@{main}"
    assert hub.local("org/model", "--model", revision="v1").endswith(old)
    assert hub.local("org/model@v1", "--model").endswith(old)
    assert os.path.isfile(hub.local("org/model/unet/config.json", "--model"))
    monkeypatch.chdir(tmp_path)
    shutil.copytree(sd15_dir, tmp_path / "org" / "model")
    assert hub.local("org/model", "--model") == "org/model"


class Counting(io.FileIO):
    """A local file that counts the bytes read from it (the stand-in's byte-range reads)."""
    read_bytes = 0

    def read(self, n=-1):
        out = super().read(n)
        Counting.read_bytes += len(out)
        return out

    def readinto(self, b):
        n = super().readinto(b)
        Counting.read_bytes += n or 0
        return n


class Hub:
    """A stand-in for HfFileSystem: hf://datasets/org/pairs/... -> a local folder, reads counted."""

    def __init__(self, root):
        self.root = str(root)

    def local(self, path):
        return os.path.join(self.root, path.removeprefix("hf://datasets/org/pairs").lstrip("/"))

    def isfile(self, path):
        return os.path.isfile(self.local(path))

    def find(self, path):
        return [os.path.join(path, os.path.relpath(os.path.join(d, f), self.local(path)))
                for d, _, fs in os.walk(self.local(path)) for f in fs]

    def open(self, path, mode="rb", block_size=None):
        return Counting(self.local(path), "r")

    def size(self, path):
        return os.path.getsize(self.local(path))


def test_a_hub_dataset_is_read_where_it_lies(tmp_path, sdxl_dir, monkeypatch, one_thread):
    """Online, a dataset's shards are not downloaded: the index reads footers and label columns by byte ranges, the
    loader the row groups it reaches; training gives the same losses as from the files on disk."""
    root = tmp_path / "set"
    (root / "data").mkdir(parents=True)
    for k in range(2):
        # (the footer holds each row group's min and max image per column: 30 rows a group keep it small)
        tiny.write_parquet(root / "data" / f"train-0000{k}-of-00002.parquet", n=120, rg=30)
    tiny.write_parquet(root / "data" / "test-00000-of-00001.parquet", n=8)
    total = sum(os.path.getsize(root / "data" / f) for f in os.listdir(root / "data"))
    monkeypatch.setattr(hub, "_fs", [Hub(root)])
    Counting.read_bytes = 0
    prefs = data.Preferences("hf://datasets/org/pairs")
    assert len(prefs) == len(data.Preferences(str(root)))
    assert "2 train shard(s)" in prefs.read and Counting.read_bytes < 0.3 * total, (Counting.read_bytes, total)
    indexed = Counting.read_bytes
    prefs.raw(0)
    assert indexed < Counting.read_bytes < indexed + 0.2 * total
    by_path = tiny.run(tmp_path / "path", sdxl_dir, str(root), steps=2)
    streamed = tiny.run(tmp_path / "hf", sdxl_dir, "hf://datasets/org/pairs", steps=2)
    assert [m["loss"] for m in streamed] == [m["loss"] for m in by_path]
    assert torch.load(tmp_path / "hf" / "checkpoint.pt", weights_only=True)["fingerprints"]["data"]["digest"] == \
        torch.load(tmp_path / "path" / "checkpoint.pt", weights_only=True)["fingerprints"]["data"]["digest"]
    # AI feedback on it: the JSONL points into the shards where they lie, and trains as the shards' own labels do
    import relabel
    relabel.main(["hf://datasets/org/pairs", "--score", "area", "--out", str(tmp_path / "aif.jsonl")])
    rows = [json.loads(line) for line in open(tmp_path / "aif.jsonl")]
    assert len(rows) == 240 and all(r["image_0"].startswith("hf://datasets/org/pairs/data/train-") for r in rows)
    assert len(data.Preferences(str(tmp_path / "aif.jsonl"))) == sum(r["label_0"] != 0.5 for r in rows)
    tiny.run(tmp_path / "aif", sdxl_dir, str(tmp_path / "aif.jsonl"), steps=1)


def test_online_fetches_only_what_it_chose(tmp_path, monkeypatch):
    """Online (a stand-in for the hub's API): the listing, model_index.json's components, then one download of
    exactly the chosen files; a data set's shards are not downloaded but opened where they lie (hf://)."""
    import huggingface_hub
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    index = tmp_path / "model_index.json"
    index.write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline",
                                 "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
                                 "text_encoder": ["transformers", "CLIPTextModel"],
                                 "tokenizer": ["transformers", "CLIPTokenizer"], "safety_checker": [None, None],
                                 "scheduler": ["diffusers", "EulerDiscreteScheduler"], "force_zeros": True}))
    listings = {"org/sdxl": SDXL_REPO, "org/pairs": ["README.md", "data/train-00000-of-00002.parquet",
                                                     "data/train-00001-of-00002.parquet"]}
    fetched = []
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", lambda self, repo, **k: listings[repo])
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo, name, **k: str(index))
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo, allow_patterns=None, **k: fetched.append((repo, allow_patterns)) or str(tmp_path))
    assert hub.local("org/sdxl", "--model") == str(tmp_path)
    got = set(fetched[-1][1])
    assert got == {"README.md", "model_index.json", "scheduler/scheduler_config.json", "text_encoder/config.json",
                   "text_encoder/model.safetensors", "tokenizer/merges.txt", "tokenizer/vocab.json",
                   "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json", "unet/config.json",
                   "unet/diffusion_pytorch_model.safetensors", "vae/config.json",
                   "vae/diffusion_pytorch_model.safetensors"}  # not text_encoder_2/ or vae_1_0/: not in the index
    hub.local("org/sdxl", "--unet_init", only=("unet/", "transformer/"))
    assert [f for f in fetched[-1][1] if "/" in f] == ["unet/config.json", "unet/diffusion_pytorch_model.safetensors"]
    assert hub.local("org/pairs@v2", "--data", repo_type="dataset") == "hf://datasets/org/pairs@v2"
    assert fetched[-1] == ("org/pairs", ["README.md"])
    assert hub.local(str(tmp_path), "--model") == str(tmp_path) and len(fetched) == 3  # a path: nothing fetched
