"""Shared fixtures: tiny diffusers pipelines (built once per session) and the kernel interpreter switch."""
import os
import sys

import pytest
import torch

# Without a GPU, Triton kernels run under the interpreter (set before any test imports triton).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # tests/ (for `import tiny`)

import tiny  # noqa: E402


@pytest.fixture(scope="session")
def sdxl_dir(tmp_path_factory):
    """A tiny random SDXL pipeline folder in the diffusers layout."""
    return tiny.make_sdxl(str(tmp_path_factory.mktemp("sdxl")))


@pytest.fixture(scope="session")
def sd15_dir(tmp_path_factory):
    """A tiny random SD1.5 pipeline folder in the diffusers layout."""
    return tiny.make_sd15(str(tmp_path_factory.mktemp("sd15")))


@pytest.fixture(scope="session")
def sd3_dir(tmp_path_factory):
    """A tiny random SD3.5 pipeline folder in the diffusers layout (CLIP-L, bigG, T5, MMDiT, 16-channel VAE)."""
    return tiny.make_sd3(str(tmp_path_factory.mktemp("sd3")))


@pytest.fixture(scope="session")
def flux_dir(tmp_path_factory):
    """A tiny random FLUX.1-dev pipeline folder in the diffusers layout (CLIP-L, T5, FLUX, 16-channel VAE)."""
    return tiny.make_flux(str(tmp_path_factory.mktemp("flux")))


@pytest.fixture(scope="session")
def jsonl(tmp_path_factory):
    """8 pairs (labels alternate 1/0) + one tie, PNG files of varied sizes, paths relative to the JSONL."""
    return tiny.write_pairs_jsonl(str(tmp_path_factory.mktemp("jsonl")))


@pytest.fixture
def one_thread():
    """Tiny models on a shared 2-core box run ~100x faster on one thread (no OpenMP spinning)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def clip_dir(tmp_path_factory):
    """A tiny transformers CLIPModel folder (32 px images) with its tokenizer, and the model itself."""
    folder, model, _ = tiny.make_clip(str(tmp_path_factory.mktemp("clip")), "quick_gelu")
    return folder, model


@pytest.fixture(scope="session")
def qwen_image_dir(tmp_path_factory):
    """A tiny random Qwen-Image pipeline folder (QwenImagePipeline: Qwen2.5-VL, its transformer, its causal VAE)."""
    import tiny_qwen
    return tiny_qwen.make_qwen_image(str(tmp_path_factory.mktemp("qwen_image")))


@pytest.fixture(scope="session")
def z_image_dir(tmp_path_factory):
    """A tiny random Z-Image pipeline folder (ZImagePipeline: Qwen3, its transformer, a 16-channel VAE)."""
    import tiny_qwen
    return tiny_qwen.make_z_image(str(tmp_path_factory.mktemp("z_image")))
