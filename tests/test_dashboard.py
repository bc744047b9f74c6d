"""--report_to tensorboard|wandb: the event files / the offline wandb run hold every logged step's numbers as
metrics.jsonl has them, the online held-out win rates and sample images; a resumed run does not log a step twice;
an unknown or uninstalled dashboard is one line."""
import glob
import importlib.util
import os
import struct

import pytest

import dpo
import tiny
from test_online import PROMPTS, flags


def tensorboard(out):
    """{tag: [(step, value)]} of the scalars and {tag: [step]} of the images in out/tensorboard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(os.path.join(out, "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    scalars = {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}
    return scalars, {t: [e.step for e in acc.Images(t)] for t in acc.Tags()["images"]}


def wandb_history(out):
    """The history records of the offline wandb run(s) in out: the .wandb file read as the log it is (a 7-byte
    header, then blocks of 32 KiB holding records: crc32, length, type (1 whole, 2 first, 3 middle, 4 last))."""
    from wandb.proto import wandb_internal_pb2 as pb
    rows = []
    for path in sorted(glob.glob(os.path.join(out, "wandb", "offline-run-*", "run-*.wandb"))):
        d, pos, part = open(path, "rb").read(), 7, b""
        while pos + 7 <= len(d):
            left = 32768 - pos % 32768
            _, n, kind = struct.unpack("<IHB", d[pos:pos + 7])
            if left < 7 or (n == 0 and kind == 0):
                pos += left
                continue
            part, pos = part + d[pos + 7:pos + 7 + n], pos + 7 + n
            if kind in (1, 4):
                r = pb.Record()
                r.ParseFromString(part)
                part = b""
                if r.WhichOneof("record_type") == "history":
                    rows.append({i.key or "/".join(i.nested_key): i.value_json for i in r.history.item})
    return rows


def test_tensorboard_holds_the_metrics_and_a_resume_does_not_repeat_steps(tmp_path, sdxl_dir, jsonl, monkeypatch,
                                                                          one_thread):
    """A run killed in step 4 after logging step 3 (its checkpoint: step 2), resumed: each step once, as
    metrics.jsonl has it."""
    import optim
    out, update, calls = tmp_path / "run", optim.update, []

    def killed_in_step_4(*a, **k):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return update(*a, **k)
    monkeypatch.setattr(optim, "update", killed_in_step_4)
    with pytest.raises(SystemExit):
        tiny.run(out, sdxl_dir, jsonl, "--report_to", "tensorboard", "--ckpt_every", "2", steps=4)
    assert [s for s, _ in tensorboard(out)[0]["loss"]] == [1, 2, 3]
    monkeypatch.setattr(optim, "update", update)
    metrics = tiny.run(out, sdxl_dir, jsonl, "--report_to", "tensorboard", "--ckpt_every", "2", "--resume", steps=4)
    scalars, _ = tensorboard(out)
    assert [s for s, _ in scalars["loss"]] == [1, 2, 3, 4]
    for key in ("loss", "model_mse", "grad_norm", "lr"):
        assert [v for _, v in scalars[key]] == pytest.approx([m[key] for m in metrics], rel=1e-6), key


def test_wandb_offline_holds_the_metrics(tmp_path, sdxl_dir, jsonl, monkeypatch, one_thread):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    metrics = tiny.run(out, sdxl_dir, jsonl, "--report_to", "wandb", steps=3)
    rows = [r for r in wandb_history(str(out)) if "loss" in r]
    assert [int(r["_step"]) for r in rows] == [1, 2, 3]
    assert [float(r["loss"]) for r in rows] == pytest.approx([m["loss"] for m in metrics], rel=1e-6)
    assert open(out / "wandb_id.txt").read().strip()


def test_online_runs_report_held_out_win_rates_and_samples(tmp_path, sdxl_dir, one_thread):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "online"
    dpo.main(flags(out, sdxl_dir, str(prompts), "--eval_every", "1", "--report_to", "tensorboard", steps=2))
    scalars, imgs = tensorboard(out)
    assert [s for s, _ in scalars["held_out/win_rate/area"]] == [0, 1, 2]
    assert scalars["held_out/win_rate/area"][0][1] == 0.5  # step 0: the policy is the base
    assert imgs["held_out/samples"] == [1, 2]
    assert [s for s, _ in scalars["score_mean"]] == [1, 2]


def test_unknown_or_missing_dashboards_are_one_line(tmp_path, sdxl_dir, jsonl, monkeypatch, capsys):
    argv = ["--model", sdxl_dir, "--data", jsonl, "--out_dir", str(tmp_path / "r"), "--report_to"]
    assert "unknown dashboard 'comet'" in tiny.cli_error(dpo.main, argv + ["tensorboard,comet"], capsys)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    assert "--report_to wandb needs the wandb package: pip install wandb" in tiny.cli_error(dpo.main,
                                                                                           argv + ["wandb"], capsys)
    assert not os.path.exists(tmp_path / "r")
