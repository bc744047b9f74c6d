"""parallel.py, one code path for 1 and N processes: FSDP2 and LoRA under torchrun give the losses of one process at
the same global batch; checkpoints resume under FSDP or DDP; the final UNet gathered from the shards; FSDP on one
rank is refused. (Plain DDP = 1 rank: test_dpo.py.)"""
import json
import os
import subprocess
import sys

import pytest
import torch

import lora
import unet as unetlib
from tiny import ENV, ROOT, run

pytestmark = pytest.mark.usefixtures("one_thread")


def _metrics(out):
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


def test_fsdp_and_lora_under_torchrun_match_one_process(tmp_path, sdxl_dir, jsonl):
    """One torchrun of 2 ranks x 1 pair (tests/ddp_runs.py) trains: FSDP (checkpointing on, the SDXL default);
    FSDP cut after step 1 and resumed; FSDP resuming a 1-process checkpoint; LoRA under DDP; LoRA under FSDP.
    Each equals 1 rank x 2 pairs at the same global batch, and the resumed run the uninterrupted one."""
    flags = ("--beta", "100", "--device", "cpu")  # beta 100: see test_two_rank_ddp_matches_one_rank
    lora_flags = ("--lora", "4", "--lora_alpha", "8", "--lr", "1e-2")
    one = run(tmp_path / "one", sdxl_dir, jsonl, *flags, steps=3)  # 1 rank x 2 pairs x 2 micro-steps
    one_lora = run(tmp_path / "one_lora", sdxl_dir, jsonl, *flags, *lora_flags, steps=3)
    run(tmp_path / "from_ddp", sdxl_dir, jsonl, *flags, "--ckpt_every", "1", steps=1)
    common = ["--model", sdxl_dir, "--data", jsonl, "--resolution", "32", "--grad_accum", "2", "--max_steps", "3",
              "--log_every", "1", "--lr", "1e-4", "--warmup", "0", "--batch_size", "1", *flags]
    runs = [["--fsdp", "--out_dir", tmp_path / "fsdp"],
            ["--fsdp", "--out_dir", tmp_path / "cut", "--max_steps", "1", "--ckpt_every", "1"],
            ["--fsdp", "--out_dir", tmp_path / "cut", "--resume"],
            ["--fsdp", "--out_dir", tmp_path / "from_ddp", "--resume"],
            ["--out_dir", tmp_path / "lora", *lora_flags],
            ["--fsdp", "--out_dir", tmp_path / "fsdp_lora", *lora_flags]]
    argv = [str(a) for flags_ in runs for a in ["::", *flags_]]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        os.path.join(ROOT, "tests", "ddp_runs.py"), *common, *argv],
                       env=ENV, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]

    def same(a, b, rel=1e-5):
        assert len(a) == len(b) == 3
        for x, y in zip(a, b):
            for k in ("loss", "model_mse", "ref_mse", "implicit_acc"):
                assert abs(x[k] - y[k]) <= rel * max(1.0, abs(x[k])), (k, x, y)
            assert abs(x["grad_norm"] - y["grad_norm"]) <= 1e-4 * x["grad_norm"], (x, y)

    same(one, _metrics(tmp_path / "fsdp"))
    same(one, _metrics(tmp_path / "from_ddp"))  # steps 2-3 resumed under FSDP from a 1-process checkpoint
    same(one_lora, _metrics(tmp_path / "lora"))
    same(one_lora, _metrics(tmp_path / "fsdp_lora"))
    keys = ("step", "loss", "model_mse", "ref_mse", "grad_norm")
    cut, full = _metrics(tmp_path / "cut"), _metrics(tmp_path / "fsdp")
    assert [[m[k] for k in keys] for m in cut] == [[m[k] for k in keys] for m in full]  # resume is exact
    # the final UNets, gathered from the shards into the diffusers layout, moved from the base as the 1-process
    # ones did (Adam's normalized steps magnify rounding in near-zero gradients: compare the whole update)
    base = unetlib.load(sdxl_dir).state_dict()
    for name, ref_name in (("fsdp", "one"), ("cut", "one"), ("fsdp_lora", "one_lora")):
        a, b = unetlib.load(str(tmp_path / name)).state_dict(), unetlib.load(str(tmp_path / ref_name)).state_dict()
        assert a.keys() == b.keys() == base.keys()
        da = torch.cat([(a[k] - base[k]).flatten() for k in base])
        db = torch.cat([(b[k] - base[k]).flatten() for k in base])
        assert db.norm() > 0 and (da - db).norm() < 1e-3 * db.norm(), (name, (da - db).norm() / db.norm())
    assert sorted(lora.read(str(tmp_path / "fsdp_lora"))) == sorted(lora.read(str(tmp_path / "one_lora")))


def test_fsdp_on_one_rank_is_refused(tmp_path, sdxl_dir, jsonl, capsys):
    with pytest.raises(SystemExit) as e:
        run(tmp_path / "one_rank", sdxl_dir, jsonl, "--fsdp")
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 1 and len(err) == 1 and "--fsdp shards the model over ranks" in err[0]
    assert not (tmp_path / "one_rank").exists()
