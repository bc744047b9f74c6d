"""--report_to tensorboard|wandb: what a run logs, also on a dashboard. metrics.jsonl stays the source of truth;
the dashboards get the same numbers (every logged step's metrics, the online reward and held-out win rates) and
the images a run makes (the held-out samples of each online check, the demo's grid).

One dashboard per process, opened by dpo.train on rank 0 (start) and closed when the run ends (close); every other
call is a no-op when none is open, so the code that logs does not ask who listens. Both packages are optional and
imported only when asked: TensorBoard writes event files into out_dir/tensorboard/ (with --resume the steps after
the checkpoint are purged, so a curve never doubles back); wandb follows its own settings (WANDB_MODE=offline,
WANDB_PROJECT, WANDB_ENTITY, `wandb login`), and a resumed run continues the same wandb run (its id is kept in
out_dir/wandb_id.txt).
"""
import importlib.util
import os
import uuid

KINDS = {"tensorboard": "tensorboard", "wandb": "wandb"}  # --report_to's names -> the package each needs
_writers = {}  # kind -> its writer, while a run is open on this process


def parse(spec):
    """--report_to "tensorboard,wandb" (or none) -> the kinds; an unknown or uninstalled one: ValueError, one line."""
    kinds = [k.strip() for k in (spec or "").split(",") if k.strip() and k.strip() != "none"]
    for k in kinds:
        if k not in KINDS:
            raise ValueError(f"--report_to {spec}: unknown dashboard {k!r} (tensorboard, wandb or none)")
        if importlib.util.find_spec(KINDS[k]) is None:
            raise ValueError(f"--report_to {k} needs the {KINDS[k]} package: pip install {KINDS[k]}")
    return kinds


def start(kinds, out_dir, config, purge=0, resume=False, project="diffusion-dpo"):
    """The dashboards of a run writing into out_dir (config: its flags). purge: a resumed run's checkpoint step, after
    which TensorBoard drops what the run logged before; resume: continue the run's wandb run (else a new one)."""
    close()
    for kind in kinds:
        if kind == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter
            after = purge + 1 if purge else None  # the checkpoint's own step stays
            _writers[kind] = SummaryWriter(os.path.join(out_dir, "tensorboard"), purge_step=after)
        else:
            import wandb
            id_file = os.path.join(out_dir, "wandb_id.txt")
            run_id = (_read(id_file) if resume else None) or uuid.uuid4().hex[:12]
            os.makedirs(out_dir, exist_ok=True)
            with open(id_file, "w") as f:
                f.write(run_id)
            _writers[kind] = wandb.init(project=os.environ.get("WANDB_PROJECT", project), dir=out_dir, id=run_id,
                                        name=os.path.basename(os.path.abspath(out_dir)), config=config,
                                        resume="allow")


def scalars(step, values, prefix=""):
    """The numbers of values (None and non-numbers left out) at step, each under prefix + its key."""
    numbers = {prefix + k: float(v) for k, v in values.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if "tensorboard" in _writers:
        for k, v in numbers.items():
            _writers["tensorboard"].add_scalar(k, v, step)
    if "wandb" in _writers and numbers:
        _writers["wandb"].log(numbers, step=step)


def image(step, tag, img):
    """A PIL image (a grid of samples) at step."""
    if "tensorboard" in _writers:
        import numpy as np
        _writers["tensorboard"].add_image(tag, np.asarray(img.convert("RGB")), step, dataformats="HWC")
    if "wandb" in _writers:
        import wandb
        _writers["wandb"].log({tag: wandb.Image(img)}, step=step)


def close():
    """Flush and close the open dashboards (the end of a run, or an error)."""
    for kind, w in list(_writers.items()):
        w.close() if kind == "tensorboard" else w.finish()
        del _writers[kind]


def _read(path):
    try:
        with open(path) as f:
            return f.read().strip() or None
    except FileNotFoundError:
        return None
