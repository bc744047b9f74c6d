"""families.py: every model path finds its record (folders, denoiser folders, single files, built models), the
records agree with diffusers, and a new family is one record: a made-up fifth one trains with nothing else changed."""
import dataclasses
import os

import pytest
import torch

import families
import lora
import tiny
import unet as unetlib
from weights import CheckpointError


@pytest.mark.parametrize("name, record", [("sd15", families.SD15), ("sdxl", families.SDXL), ("sd3", families.SD3),
                                          ("flux", families.FLUX)])
def test_every_model_path_finds_its_record(name, record, request, tmp_path):
    """A diffusers root, its denoiser's folder, the built model, and (UNets) the single file the record saves."""
    root = request.getfixturevalue(f"{name}_dir")
    assert families.of(root) is record
    assert families.of(os.path.join(root, record.subfolder)) is record
    model = families.load(root)
    assert families.of_model(model) is record and isinstance(model, record.model)
    if "single" in record.layouts:  # with its config in the metadata, then as the original files have it: keys only
        path = str(tmp_path / "single.safetensors")
        unetlib.save(model, path, layout="single")
        assert families.of(path) is record
        assert families.of_keys({f"{record.file_keys[0]}x": 0}, "f") is record


def test_records_name_diffusers_classes_and_refuse_others(sdxl_dir, tmp_path):
    """Each record's diffusers_class is the class diffusers builds its denoiser with; a config of another class, a
    file without any record's keys and a missing path are refused in one line that names the families."""
    import diffusers
    for fam in families.FAMILIES:
        assert hasattr(diffusers, fam.diffusers_class), fam.name
    with pytest.raises(CheckpointError, match="not the denoiser of SD1.5, SDXL, SD3, FLUX, Qwen-Image or Z-Image"):
        families.of_config({"_class_name": "PixArtTransformer2DModel"}, "x")
    with pytest.raises(CheckpointError, match="not a checkpoint of"):
        families.of_keys({"something.else": 0}, "f")
    with pytest.raises(CheckpointError, match="does not exist"):
        families.of(str(tmp_path / "nowhere"))
    assert families.released("flux-dev")[0] is families.FLUX and families.released("nope") is None
    assert len(families.RELEASED) == len(set(families.RELEASED))  # one record per released name


def test_a_fifth_family_is_one_record(sd15_dir, jsonl, tmp_path, monkeypatch, capsys):
    """The checklist's claim, in one test: a made-up family (SD1.5's UNet recognised by another config, its own
    title, beta, warmup and LoRA targets) is added to FAMILIES and nothing else; a LoRA DPO run trains with the
    record's numbers and adapts the record's layers only."""
    alt = dataclasses.replace(
        families.SD15, name="sd15-alt", title="SD1.5-alt", released={},
        recognise=lambda config: config.get("cross_attention_dim") == 32 and not config.get("addition_embed_type"),
        lora_targets=("to_q", "to_v"), recipe=families.Recipe(32, 0, "adamw", False, beta={"dpo": 1234.0}))
    monkeypatch.setattr(families, "FAMILIES", (alt, *families.FAMILIES))
    assert families.of(sd15_dir) is alt and families.names().startswith("SD1.5-alt")
    out = tmp_path / "run"
    metrics = tiny.run(out, sd15_dir, jsonl, "--lora", "4")  # no --beta: the record's
    assert "SD1.5-alt dpo beta=1234.0" in capsys.readouterr().out
    assert len(metrics) == 2 and all(torch.isfinite(torch.tensor(m["loss"])) for m in metrics)
    adapted = lora.read(str(out))  # layer name -> (A, B)
    assert {name.rsplit(".", 1)[-1] for name in adapted} == {"to_q", "to_v"}
