"""The run plumbing the scripts share, so each script stays one linear story. Read the first part: set-up (device,
DDP, precision), batches and the learning rate, logging, checkpoints, and `Run`, the one object a trainer's main()
holds. A first reading can stop at the line that says so; what follows keeps runs safe (flag checks, memory and NaN
checks, exact resumption, safe loading, the folder lock).
"""
import argparse
import atexit
import contextlib
import glob
import math
import os
import pickle
import re
import shlex
import signal
import sys
import time
import warnings
from dataclasses import asdict
from functools import partial
from stat import S_ISREG

import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader

import data
import pvdm


# ----------------------------------------------------------------------------------------------
# Set-up: device, processes, precision
# ----------------------------------------------------------------------------------------------


def init_process(args):
    """This process's rank, the world size and its device. Under torchrun the process joins the group (nccl on CUDA,
    gloo on CPU); under plain python it is a world of one. Also sets args.device, args.precision, the seed and TF32."""
    distributed = "RANK" in os.environ
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = resolve_device(args.device)
    args.device = str(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if distributed:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if args.batch_size < world or args.batch_size % world:
        fail(f"--batch-size {args.batch_size} cannot be split evenly over {world} processes; "
             f"use a multiple of {world}.", distributed)
    args.precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    torch.manual_seed(args.seed + rank)  # each rank draws different noise and timesteps
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return rank, world, device


def wrap_ddp(model, device, world):
    """The model in DistributedDataParallel under torchrun (gradients averaged over the ranks); alone, as it is."""
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else model


def mean_over_ranks(value, world):
    """The logged loss is the average over all ranks, not rank 0's alone."""
    value = value.detach().float().clone()
    if world > 1:
        dist.all_reduce(value)
    return value.item() / world


def teardown(world):
    """Leave the process group at the end, so torchrun sees every rank finish cleanly."""
    if world > 1:
        dist.destroy_process_group()


def autocast(device, precision):
    """The one mixed-precision context of every forward pass; a no-op in fp32. device: a torch.device or its type."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def new_scaler(device, args, state=None, path=None):
    """fp16's loss scaler (a no-op in other precisions), continuing the `state` a checkpoint saved on resume."""
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")
    if state and scaler.is_enabled():
        rebuilt(path, lambda: scaler.load_state_dict(state))
    return scaler

# ----------------------------------------------------------------------------------------------
# Batches, the learning rate, logging
# ----------------------------------------------------------------------------------------------


def batches(dataset, batch_size, rank, world, seed, start_step, workers):
    """Endless batches for this rank. The order is a pure function of (seed, epoch), so a resumed run
    picks up exactly where the killed one stopped, without re-reading the clips it skips."""
    per_epoch = len(dataset) // (batch_size * world)  # optimiser steps per epoch
    if per_epoch == 0:
        raise SystemExit(f"error: the dataset has {len(dataset)} clips, fewer than one global batch of "
                         f"{batch_size * world}; lower --batch-size.")
    step = start_step
    while True:
        epoch, offset = divmod(step, per_epoch)
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)  # clip start frames for this epoch
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed + epoch))
        mine = order[: per_epoch * batch_size * world][rank::world]  # this rank's share
        loader = DataLoader(dataset, batch_size, sampler=mine[offset * batch_size:].tolist(), num_workers=workers,
                            drop_last=True, pin_memory=torch.cuda.is_available(),
                            generator=torch.Generator().manual_seed(seed + epoch))  # leaves the global stream alone
        try:
            for batch in loader:
                yield batch
                step += 1
        except data.DataError as error:  # from a worker, the message ends with the dataset's own line
            raise SystemExit(f"error: {str(error).splitlines()[-1].removeprefix('data.DataError: ')}") from None


def learning_rate(step, args):
    """The rate for optimiser step `step` (0-based): linear warm-up, then constant or cosine decay to 0 (which
    settles the weights: the tiny autoencoder ends sharper). A pure function of the step, so resuming continues it."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    if args.lr_decay == "constant":
        return args.lr
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * 0.5 * (1 + math.cos(math.pi * progress))


def num_shapes_option(args, trained=None):
    """make_dataset's shape-count option: --num-shapes if given, else `trained` (the shapes per video a model was
    trained on; pass it for synthetic data only), else none (the set's default)."""
    num_shapes = args.num_shapes if args.num_shapes is not None else trained
    return {} if num_shapes is None else {"num_shapes": num_shapes}


def trained_num_shapes(ckpt):
    """Shapes per video of the synthetic clips a checkpoint's model learnt (None: real data; none recorded: two)."""
    return ckpt.get("num_shapes", 2 if ckpt.get("args", {}).get("data") == "synthetic" else None)


def log(rank, out, text):
    """Rank 0 prints and appends to OUT/log.txt."""
    if rank == 0:
        print(text, flush=True)
        with open(os.path.join(out, "log.txt"), "a") as f:
            f.write(text + "\n")


class TrainingMeter:
    """The log line's throughput and peak GPU memory, and once, a few steps in, the projected time to --steps."""

    def __init__(self, device, step, args, say):
        self.device, self.args, self.say, self.start, self.step0 = device, args, say, time.time(), step
        self.first, self.said = None, False  # first: (step, time) at the end of the first step

    def line(self, step):
        rate = (step - self.step0) * self.args.batch_size / (time.time() - self.start)
        if self.device.type != "cuda":
            return f"{rate:.1f} clips/s"
        return f"{rate:.1f} clips/s | peak mem {torch.cuda.max_memory_allocated(self.device) / 2**30:.1f} GB"

    def project(self, step):
        """Says once, after 5 steps or 30 s (timed from the end of the first step, so start-up does not count),
        how long the run will take to reach --steps at this pace."""
        self.first = self.first or (step, time.time())
        done, spent, total = step - self.first[0], time.time() - self.first[1], self.args.steps
        if self.said or not (done >= 5 or done and spent >= 30) or step >= total:
            return
        left, self.said = spent / done * (total - step), True
        days = f" ({left / 86400:.1f} days)" if left >= 86400 else ""
        hint = ("; the paper preset on a CPU takes days: --preset tiny trains a small model in minutes"
                if self.device.type == "cpu" and self.args.preset == "paper" else "")
        self.say(f"projected: {data.fmt_time(left)}{days} more to step {total}, at {spent / done:.2f} s per step"
                 + hint)


# ----------------------------------------------------------------------------------------------
# Checkpoints: self-describing, plain types, written atomically
# ----------------------------------------------------------------------------------------------


def save_checkpoint(obj, path):
    """Write atomically: a run killed mid-save leaves the previous checkpoint intact. Refuses NaN or inf anywhere in
    obj, so a blown-up model never replaces a good checkpoint; a full disk is one line, and no temporary file."""
    bad = nonfinite(obj)
    if bad is not None:
        raise SystemExit(f"error: not writing {path}: {bad} holds NaN or inf. {what_is_left(path)}")
    tmp = f"{path}.pvdm-tmp.{os.getpid()}"  # the marker remove_stale_temporaries looks for
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)  # atomic on POSIX and Windows
    except (OSError, RuntimeError) as error:  # torch reports a full disk as a RuntimeError
        with contextlib.suppress(OSError):
            os.remove(tmp)
        reason = getattr(error, "strerror", None) or "the disk may be full, or the folder not writable"
        raise SystemExit(f"error: could not write {path} ({reason}). "
                         f"{what_is_left(path, 'once there is space, or with another --out')}") from None


def load_checkpoint(path, kind, resume=False):
    """Load a self-describing checkpoint (plain types only, so weights_only=True) and check its kind and keys."""
    if not os.path.exists(path):
        stem, ext = os.path.splitext(path)
        aside = sorted(glob.glob(f"{glob.escape(stem)}.[0-9]*{ext}"))  # what --start-over set aside
        raise SystemExit(f"error: no {kind} checkpoint at {path}; train one first or pass the right path" + (
            f" (--start-over set {aside[-1]} aside: rename it to {path} to resume it)." if aside else "."))
    fix = f"pass a checkpoint that train_{kind}.py wrote"
    ckpt = load_file(path, f"the {kind} checkpoint", fix)
    if not isinstance(ckpt, dict) or ckpt.get("kind") != kind:
        found = ckpt.get("kind", "unknown") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise SystemExit(f"error: {path} holds a checkpoint of kind {found!r}, not {kind!r}; {fix}.")
    wanted = CHECKPOINT_KEYS[kind] | (RESUME_KEYS if resume else {})
    missing = [k for k in wanted if entry(ckpt, k) is None]
    if missing:
        raise SystemExit(f"error: {path} lacks {', '.join(missing)}, so it is incomplete; {fix}.")
    wrong = [k for k, kind_of in wanted.items() if not isinstance(entry(ckpt, k), kind_of)]
    if wrong:
        raise SystemExit(f"error: {path} holds {', '.join(wrong)} of the wrong type, so it is damaged; {fix}.")
    return ckpt


def load_autoencoder(path, device="cpu"):
    """Rebuild a trained autoencoder from its checkpoint alone (config + weights), in eval mode."""
    return autoencoder_from_checkpoint(load_checkpoint(path, "autoencoder"), device, path)


def autoencoder_from_checkpoint(ckpt, device="cpu", path="the checkpoint"):
    """The same, from a checkpoint already loaded (to read its other entries too)."""
    def build():
        model = pvdm.ProjectedAutoencoder(pvdm.AutoencoderConfig(**ckpt["config"]))
        model.load_state_dict(ckpt["model"])
        return model
    return rebuilt(path, build).to(device).eval()


def load_diffusion(path, device, autoencoder_path=None, ema=True):
    """(autoencoder, diffusion, step, autoencoder path) in eval mode: a trained diffusion model (EMA weights unless
    ema=False) and the autoencoder its checkpoint records (or the one given), refusing a pair that does not match."""
    ckpt = load_checkpoint(path, "diffusion")
    autoencoder_path = autoencoder_path or recorded_autoencoder(path, ckpt["autoencoder"]["path"])
    if not ema and not isinstance(ckpt.get("model"), dict):
        raise SystemExit(f"error: {path} holds its EMA weights only (an exported model); drop --no-ema.")
    if not os.path.isfile(autoencoder_path):
        raise SystemExit(f"error: no autoencoder at {autoencoder_path} (the one {path} was trained with); pass its "
                         "path with --autoencoder.")
    autoencoder = load_autoencoder(autoencoder_path, device)
    ucfg = rebuilt(path, lambda: pvdm.UNetConfig(**ckpt["unet_config"]))
    ae_shape = (autoencoder.cfg.latent_channels, *autoencoder.cfg.latent_size)
    unet_shape = (ucfg.latent_channels, ucfg.frames, ucfg.size, ucfg.size)
    if ae_shape != unet_shape:
        raise SystemExit(f"error: {autoencoder_path} makes latents of shape (C, t, h, w) = {ae_shape}, but {path} "
                         f"denoises {unet_shape}; pass the autoencoder the diffusion model was trained with.")
    check_same_autoencoder(path, ckpt["autoencoder"], autoencoder, autoencoder_path)
    weights = "ema" if ema else "model"
    diffusion = rebuilt(path, lambda: pvdm.GaussianDiffusion(pvdm.TriplaneUNet(ucfg),
                                                             pvdm.DiffusionConfig(**ckpt["diffusion_config"])))
    rebuilt(path, lambda: diffusion.model.load_state_dict(ckpt[weights]))
    for name, module in ((autoencoder_path, autoencoder), (f"{path} ({weights} weights)", diffusion)):
        if nonfinite(module) is not None:
            raise SystemExit(f"error: {name} holds NaN or inf weights, so every video would be black; use an earlier "
                             "checkpoint or train again.")
    return autoencoder, diffusion.to(device).eval(), ckpt.get("step", 0), autoencoder_path


def recorded_autoencoder(path, recorded):
    """The autoencoder a diffusion checkpoint records, or the file of that name beside it: a folder moved whole
    (pretrained/, or a run copied elsewhere) still finds its pair."""
    beside = os.path.join(os.path.dirname(path), os.path.basename(recorded))
    return beside if not os.path.isfile(recorded) and os.path.isfile(beside) else recorded


def export_model(path, out):
    """The model as shipped: OUT/autoencoder.pt and OUT/diffusion.pt from the stage-2 checkpoint at `path` and the
    autoencoder it records, weights only (the UNet's EMA, no optimiser or random state) in half precision, which
    halves the files; loading makes them float32 again. The diffusion file names the exported autoencoder by the
    fingerprint of its rounded weights."""
    ckpt = load_checkpoint(path, "diffusion")
    ae_path = recorded_autoencoder(path, ckpt["autoencoder"]["path"])
    ae = load_checkpoint(ae_path, "autoencoder")
    half = lambda state: {k: v.half() if v.is_floating_point() else v for k, v in state.items()}  # noqa: E731
    os.makedirs(out, exist_ok=True)
    ae = {k: ae[k] for k in ("kind", "config", "step", "num_shapes")} | {"model": half(ae["model"])}
    shipped_ae = pvdm.ProjectedAutoencoder(pvdm.AutoencoderConfig(**ae["config"]))
    shipped_ae.load_state_dict(ae["model"])
    save_checkpoint(ae, os.path.join(out, "autoencoder.pt"))
    record = {"path": os.path.join(out, "autoencoder.pt"), "fingerprint": pvdm.fingerprint(shipped_ae)}
    keep = ("kind", "unet_config", "diffusion_config", "step")
    save_checkpoint({k: ckpt[k] for k in keep} | {"ema": half(ckpt["ema"]), "autoencoder": record},
                    os.path.join(out, "diffusion.pt"))
    print(f"wrote {out}/autoencoder.pt and {out}/diffusion.pt (step {ckpt['step']} of {path}, EMA weights, fp16)")


# ----------------------------------------------------------------------------------------------
# A training run: what each trainer's main() calls, so that its loop shows only the model's work
# ----------------------------------------------------------------------------------------------


class Run:
    """One training run of `kind` ("autoencoder" or "diffusion"): the process and its device, the output folder (locked;
    a trained checkpoint is never overwritten), the checkpoint to continue on --resume, the log, and what every step
    ends with: the loss averaged over the ranks, the NaN check, the log line and, every --save-every steps, the save."""

    def __init__(self, args, kind):
        self.args, self.kind = args, kind
        self.rank, self.world, self.device = init_process(args)
        self.path = prepare_out(args, f"{kind}.pt", self.rank, self.world)
        self.ckpt = load_checkpoint(self.path, kind, resume=True) if args.resume else {}
        self.step = self.ckpt.get("step", 0)

    def fail(self, message):
        fail(message, self.world > 1)

    def log(self, text):
        log(self.rank, self.args.out, text)

    def resume(self, configs, **states):
        """On --resume: refuse a checkpoint of other configs ({checkpoint key: config}), then load the `states`
        (model=..., optimizer=...) and the random streams, so the run goes on as if it had never stopped."""
        if not self.args.resume:
            return
        differs = [change for key, cfg in configs.items() for change in config_changes(self.ckpt[key], cfg)]
        if differs:
            self.fail(f"{self.path} was trained with a different config ({'; '.join(differs)}); resume with its "
                      "flags, or start a new --out.")
        load_states(self.path, self.ckpt, **states)
        restore_rng(self.ckpt.get("rng"), self.rank, self.device, self.path)

    def prepare(self, model, scalers=("scaler",)):
        """The model wrapped for DDP under torchrun (as it is alone), and fp16's loss scaler for each name."""
        return wrap_ddp(model, self.device, self.world), *(
            new_scaler(self.device, self.args, self.ckpt.get(key), self.path) for key in scalers)

    def start(self, dataset, recipe, sized_step):
        """The batches of this rank from the step reached, once the recipe is said and, for the paper preset, the
        memory checked (sized_step(batch) -> (model, loss) on fake tensors). --start-over sets the old checkpoint aside
        only now, once every input is checked, and Ctrl-C from here on ends the run in one line."""
        args = self.args
        self.log(f"recipe (preset {args.preset}): " + ", ".join(f"{key} {getattr(args, key)}" for key in recipe)
                 + f", precision {args.precision}")
        say_if_done(self.rank, args, self.path, self.step)
        need = check_fits(args, self.device, self.world, sized_step)
        if need:
            self.log(f"memory: about {need / 2**30:.1f} GB per training step at batch {args.batch_size // self.world} "
                     f"per process (estimated on fake tensors)")
        self.stop_if_interrupted = begin_training(args, self.path, self.rank)
        self.meter = TrainingMeter(self.device, self.step, args, say=self.log)
        return batches(dataset, args.batch_size // self.world, self.rank, self.world, args.seed, self.step,
                       args.workers)

    def set_learning_rate(self, *optimizers):
        """This step's rate (warm-up, then cosine or constant) into the optimisers; returns it."""
        self.stop_if_interrupted()  # Ctrl-C in a finaliser is acted on here (see begin_training)
        lr = learning_rate(self.step, self.args)
        for group in (g for opt in optimizers for g in opt.param_groups):
            group["lr"] = lr
        return lr

    def end_step(self, loss, modules, text=""):
        """Count the step; stop on a non-finite loss, or on non-finite weights in `modules` when this step saves; log
        (with `text` after the loss). Returns whether this step saves (the caller then builds the checkpoint and calls
        save) on this rank."""
        args, self.step = self.args, self.step + 1
        loss_value = mean_over_ranks(loss, self.world)
        saving = self.step % args.save_every == 0 or self.step == args.steps
        check_finite(loss_value, self.step, self.path, modules if saving else [])
        self.rng = rng_states(self.device, self.world) if saving else None  # gathered from every rank
        self.meter.project(self.step)  # once, a few steps in: the time to --steps at this pace
        if self.step % args.log_every == 0 or self.step == args.steps:
            self.log(f"step {self.step:6d} | loss {loss_value:.4f}{text} | lr {learning_rate(self.step - 1, args):.2e} "
                     f"| {self.meter.line(self.step)}")
        return saving and self.rank == 0

    def save(self, ckpt):
        """Write the checkpoint (atomically; refused if anything in it is NaN), with the step, args and random state."""
        save_checkpoint({"kind": self.kind, **ckpt, "step": self.step, "args": vars(self.args), "rng": self.rng},
                        self.path)

    def finish(self):
        teardown(self.world)


# ==============================================================================================
# A first reading can stop here. What follows keeps runs safe and changes nothing a model learns.
# ==============================================================================================

# ----------------------------------------------------------------------------------------------
# Flags: every number and device is checked where it enters
# ----------------------------------------------------------------------------------------------


def number_in(kind, low=-math.inf, high=math.inf, open_low=False, open_high=False):
    """An argparse type: a finite int or float from low to high (an end left out when open_*); a value it refuses
    gets the allowed range in the message."""
    name = "whole number" if kind is int else "finite number"
    allowed = ((f"from {low} to {high}" if high < math.inf else f">= {low}") if kind is int else
               "in " + ("(" if open_low else "[") + f"{low:g}, {high:g}" + (")" if open_high else "]"))

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {name.removeprefix('finite ')}") from None
        outside = not (math.isfinite(value) and low <= value <= high)
        if outside or value == low and open_low or value == high and open_high:
            raise argparse.ArgumentTypeError(f"{text} is out of range; use a {name} {allowed}")
        return value
    return parse


int_in = lambda low, high=math.inf: number_in(int, low, high)  # noqa: E731
float_in = partial(number_in, float)
positive_int, non_negative_int, finite_float, probability = int_in(1), int_in(0), float_in(), float_in(0, 1)
learning_rate_value = float_in(0, 1, open_low=True)


def device_name(text):
    """An argparse type: cpu, cuda (under torchrun: this rank's GPU) or cuda:N."""
    if text in ("cpu", "cuda") or re.fullmatch(r"cuda:\d+", text):
        return text
    raise argparse.ArgumentTypeError(f"unknown device {text!r}; choose cpu, cuda or cuda:N")


def resolve_device(name):
    """The torch.device a --device value names (None: cuda when available; cuda: cuda:LOCAL_RANK under torchrun,
    cuda:0 alone), or one line saying why it cannot be used."""
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        name = f"cuda:{os.environ.get('LOCAL_RANK', 0)}"
    device, count = torch.device(name), torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device.type == "cuda" and device.index >= count:
        raise SystemExit(f"error: --device {name} asked for, but this torch sees {count} CUDA GPU(s); "
                         + ("use --device cpu." if count == 0 else f"use cuda:0 to cuda:{count - 1}."))
    return device


def add_data_args(p):
    """The data flags shared by the training and evaluation scripts."""
    p.add_argument("--data", default="synthetic", choices=data.DATASETS, help="synthetic needs no download, footage "
                   f"needs `{data.FOOTAGE_INSTALL}`; the others read --data-dir")
    p.add_argument("--data-dir", default=None, help="root of the ucf101 / sky / folder data")
    p.add_argument("--split", default="train", choices=data.SPLITS)
    p.add_argument("--frame-stride", type=positive_int, default=1, help="take every n-th frame")
    p.add_argument("--workers", type=non_negative_int, default=2, help="DataLoader worker processes")
    p.add_argument("--num-shapes", type=int_in(1, 8), help="synthetic data only: shapes per video (default 1; 2 is a "
                   "harder set)")
    return p


LAPTOP_DATA = ("synthetic", "footage")  # the quick starts' data, which the tiny presets are sized for


def preset_help(stage, key, text=""):
    """A flag's help with what each preset of pvdm.PRESETS sets it to, as --help shows it."""
    values = "; ".join(f"{name}: {preset[stage][key]}" for name, preset in pvdm.PRESETS.items())
    return f"{text} (default: the preset's; {values})".lstrip()


def parse_for_data(parser, argv, data_defaults, stage):
    """Parse argv; a flag left out takes the chosen --data's default from `data_defaults` (so each quick start runs
    with no extra flag), else the preset's from pvdm.PRESETS[preset][stage]. The preset is tiny on the quick starts'
    data and paper on the others, unless --preset says."""
    chosen = parser.parse_known_args(argv)[0].data
    parser.set_defaults(**data_defaults.get(chosen, {}))
    args = parser.parse_args(argv)
    args.preset = args.preset or ("tiny" if args.data in LAPTOP_DATA else "paper")
    for key, value in pvdm.PRESETS[args.preset][stage].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    return args


def add_common_args(p, out, stage):
    """Flags both training stages share; `stage` names their defaults' row of pvdm.PRESETS. --batch-size is the global
    batch, split evenly over the ranks."""
    add_data_args(p)
    p.add_argument("--resolution", type=int_in(1, 1024), help="frame size (default: the preset's)")
    p.add_argument("--frames", type=int_in(1, 1024), help="frames per clip (default: the preset's)")
    p.add_argument("--batch-size", type=positive_int, help=preset_help(stage, "batch_size", "global batch"))
    p.add_argument("--steps", type=positive_int, help=preset_help(stage, "steps", "optimiser steps in total"))
    p.add_argument("--warmup", type=non_negative_int, help=preset_help(stage, "warmup", "steps of linear warm-up"))
    p.add_argument("--lr-decay", choices=["cosine", "constant"],
                   help=preset_help(stage, "lr_decay", "after warm-up: cosine decay to zero at --steps, or constant"))
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--grad-checkpointing", action=argparse.BooleanOptionalAction,
                   help=preset_help(stage, "grad_checkpointing", "recompute each block's activations in backward: "
                                    "less memory, more time"))
    p.add_argument("--out", default=out, help=f"folder for the checkpoint, previews and log (default: {out} on "
                   f"synthetic data, else runs/DATA/{os.path.basename(out)})")
    either = p.add_mutually_exclusive_group()
    either.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    either.add_argument("--start-over", action="store_true",
                   help="train afresh although --out holds a checkpoint; the old one is kept beside it, renamed")
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--log-every", type=positive_int, default=50)
    p.add_argument("--save-every", type=positive_int, default=500)
    p.add_argument("--device", type=device_name, help="cpu, cuda or cuda:N (default: cuda when available)")

# ----------------------------------------------------------------------------------------------
# Checks, safe loading and exact resumption: one line, never a lost model or a mismatched pair
# ----------------------------------------------------------------------------------------------


def fail(message, distributed=False):
    """A user error found at start-up: one line, and a clean exit on every rank."""
    if distributed:
        dist.destroy_process_group()
    raise SystemExit(f"error: {message}")


def check_fits(args, device, world, build):
    """The paper preset, before training allocates: the memory a training step needs on this rank, estimated on fake
    tensors (fp32 weights, gradients and AdamW's two moments, plus what the forward keeps for backward), in bytes.
    Memory that is not there is one line naming the flag that fits, not a kernel's kill minutes later.
    build(batch): (model, loss). None for the tiny preset."""
    if args.preset != "paper":
        return None
    kept = {}  # storage -> bytes of every tensor saved for backward

    def keep(t):
        kept[t.untyped_storage()._cdata] = t.untyped_storage().nbytes()
        return t
    with FakeTensorMode(), autocast("cpu", args.precision), torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        model, loss = build(args.batch_size // world)
        loss.backward()
    weights = {p.untyped_storage()._cdata for p in model.parameters()}
    need = 16 * sum(p.numel() for p in model.parameters()) + sum(v for k, v in kept.items() if k not in weights)
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else free_ram()
    if need > free:
        fix = ("pass --preset tiny, which trains in minutes on a CPU, or use a GPU" if device.type == "cpu" else
               "lower --batch-size, add --grad-checkpointing, or pass --preset tiny")
        raise SystemExit(f"error: the paper preset needs about {need / 2**30:.0f} GB per training step at batch "
                         f"{args.batch_size // world}, but this {device.type} has {free / 2**30:.0f} GB free; {fix}.")
    return need


def free_ram():
    """Memory the kernel can still give this process (Linux: MemAvailable), else the machine's total."""
    with contextlib.suppress(OSError, StopIteration):
        with open("/proc/meminfo") as f:
            return 1024 * int(next(line for line in f if line.startswith("MemAvailable")).split()[1])
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def nonfinite(tree):
    """The name of the first floating tensor holding NaN or inf in a module or a nested checkpoint dict, or None."""
    items = tree.state_dict().items() if isinstance(tree, torch.nn.Module) else (
        tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, (list, tuple)) else ())
    for key, value in items:
        if torch.is_tensor(value) and value.is_floating_point() and not torch.isfinite(value).all():
            return str(key)
        found = None if torch.is_tensor(value) else nonfinite(value)
        if found is not None:
            return f"{key}.{found}"
    return None


def what_is_left(ckpt_path, then="with a lower --lr or --precision fp32"):
    """What a stopped run leaves behind, in words, with what to do next."""
    if os.path.exists(ckpt_path):
        return f"The last checkpoint, {ckpt_path}, is intact: resume from it {then}."
    return f"No checkpoint was written yet: start again {then}."


def check_finite(loss, step, ckpt_path, modules=()):
    """Stop at a non-finite loss, or at non-finite weights in the modules about to be saved (the loss comes before the
    optimiser step, so a finite one can still leave NaN weights). Every rank checks, so all stop together."""
    bad = None if math.isfinite(loss) else f"the loss became {loss}"
    for module in modules:
        name = bad is None and nonfinite(module)
        bad = bad or name and f"the weights became non-finite ({name})"
    if bad:
        raise SystemExit(f"error: {bad} at step {step}; stopping without saving. {what_is_left(ckpt_path)}")


def say_if_done(rank, args, ckpt_path, step):
    """A resumed run already at --steps trains nothing: one line says so, rather than a silent exit."""
    if step >= args.steps:
        log(rank, args.out, f"{ckpt_path} is already at step {step} of --steps {args.steps}; pass a larger --steps "
            "to train on.")


def rng_states(device, world):
    """Every rank's random state (CPU and GPU), for the checkpoint: a resumed run draws the noise of an unbroken one."""
    state = [torch.get_rng_state()] + ([torch.cuda.get_rng_state(device)] if device.type == "cuda" else [])
    states = [state] * world
    if world > 1:
        dist.all_gather_object(states, state)
    return states


def restore_rng(states, rank, device, path):
    """Continue the random streams the checkpoint at `path` saved (unless it had another number of ranks)."""
    def restore():
        torch.set_rng_state(states[rank][0])
        if device.type == "cuda" and len(states[rank]) > 1:
            torch.cuda.set_rng_state(states[rank][1], device)
    if states is not None and len(states) > rank:
        rebuilt(path, restore)


def load_file(path, what, fix):
    """The one way a checkpoint or cache is read: torch.load with weights_only=True, so a hostile pickle never runs.
    A missing, empty, truncated, foreign or hostile file is one line naming it and `fix`, what to do."""
    path = str(path)
    problem = ("is a folder, not a file" if os.path.isdir(path) else "does not exist" if not os.path.isfile(path)
               else "is empty" if os.path.getsize(path) == 0 else None)
    if problem is None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch warns before failing on some foreign files
                return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:  # torch's own message here suggests weights_only=False: never do that
            problem = "holds more than tensors and plain values (foreign, damaged or hostile), so it was not unpickled"
        except Exception:  # zip and OS errors of truncated or damaged files
            problem = "cannot be read (it is truncated, damaged or not a PyTorch file)"
    raise SystemExit(f"error: {what} {path} {problem}; {fix}.")


# What every checkpoint of a kind holds (each entry's type; dotted: an entry inside one), and what resuming needs.
CHECKPOINT_KEYS = {"autoencoder": {"config": dict, "model": dict},
                   "diffusion": {"unet_config": dict, "diffusion_config": dict, "ema": dict,
                                 "autoencoder": dict, "autoencoder.path": str, "autoencoder.fingerprint": str}}
RESUME_KEYS = {"optimizer": dict, "step": int}


def entry(tree, dotted):
    """tree["a"]["b"] for "a.b", or None where a level is missing or not a dict."""
    for key in dotted.split("."):
        tree = tree.get(key) if isinstance(tree, dict) else None
    return tree


def rebuilt(path, build):
    """build() a model from a loaded checkpoint, answering a config or weights this code cannot use in one line."""
    try:
        return build()
    except (TypeError, ValueError, RuntimeError, KeyError, IndexError) as error:
        raise SystemExit(f"error: {path} holds a config or weights this code cannot rebuild a model from "
                         f"({str(error).splitlines()[0][:200]}); pass a checkpoint this version wrote.") from None


def config_changes(saved, current):
    """Fields in which a checkpoint's config (a dict, read through the dataclass so a field added since reads at its
    default) differs from this run's. Activation checkpointing leaves the model as it is: resuming may switch it."""
    try:
        there = asdict(type(current)(**saved))
    except (TypeError, ValueError) as error:  # a field this code does not know, or a value it refuses
        return [f"one this code cannot read: {error}"]
    return [f"{key} {there[key]} there, {value} here" for key, value in asdict(current).items()
            if key != "grad_checkpointing" and there[key] != value]


def load_states(path, ckpt, **targets):
    """On resume, each model or optimiser in `targets` loads ckpt[its keyword]; a mismatch is one line, not a trace."""
    for key, target in targets.items():
        rebuilt(path, lambda: target.load_state_dict(ckpt[key]))


def check_same_autoencoder(path, record, autoencoder, autoencoder_path):
    """Refuse an autoencoder other than the one a diffusion checkpoint records: its latents would be noise here."""
    if pvdm.fingerprint(autoencoder) != record["fingerprint"]:
        raise SystemExit(f"error: {path} was trained with a different autoencoder than {autoencoder_path} (weights "
                         f"fingerprint differs); pass the one it was trained with, {record['path']} when it was "
                         "saved (a --start-over run keeps the old one beside the new, renamed with the time).")


# ----------------------------------------------------------------------------------------------
# The output folder: one run at a time, nothing trained overwritten, no stale temporary files
# ----------------------------------------------------------------------------------------------


def make_out_dir(out):
    """Create --out, or say in one line why it cannot be (a file in the way, no permission)."""
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as error:
        raise SystemExit(f"error: cannot create --out {out} ({error.strerror}: {error.filename}); pass a folder "
                         "path.") from None


def lock_exclusively(fd):
    """The kernel's lock on an open file, this process's alone (not its forked workers') to its end; False if taken."""
    try:
        if os.name == "nt":
            import msvcrt
            os.lseek(fd, 1 << 20, os.SEEK_SET)  # lock a byte past the text, so others can still read the pid
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        else:
            import fcntl
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # closing any descriptor of the file would drop it: see HELD
        return True
    except (BlockingIOError, PermissionError):  # held: EWOULDBLOCK on POSIX, EACCES on Windows
        return False


LOCK_TEXT = re.compile(r"(?:pvdm run )?(\d{1,10})(?:@\S+)?", re.ASCII)  # 'pvdm run PID', or an older lock's text
HELD = {}  # run.lock path -> its locked descriptor, the only one this process ever opens on it


def take_lock(out):
    """One run per folder: an exclusive kernel lock on OUT/run.lock, held until this process ends, so a killed run
    never leaves the folder stuck. The file names the run's pid, for the message a second run gets, and is removed at
    exit; a run.lock this project did not write is never overwritten, a link or special file never opened."""
    lock = os.path.join(os.path.realpath(out), "run.lock")  # one key per folder for HELD, however it is named
    clear = f"if no run uses {out}, delete {lock}, or pass another --out"
    if lock in HELD and os.path.lexists(lock) and os.path.samestat(os.fstat(HELD[lock]), os.lstat(lock)):
        return  # main() run again in this process (a notebook): it holds the lock already
    while True:
        fd = None
        try:
            if os.path.lexists(lock) and not S_ISREG(os.lstat(lock).st_mode):  # a FIFO, folder or link
                raise SystemExit(f"error: {lock} is not a regular file; {clear}.")
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0))
            if not lock_exclusively(fd):
                found = LOCK_TEXT.fullmatch(read_text(fd))
                os.close(fd)
                raise SystemExit(f"error: another run (pid {found[1] if found else 'unknown'}) is using {out}; wait "
                                 "for it to finish, or pass another --out.")
            if os.path.samestat(os.fstat(fd), os.lstat(lock)):
                break
            os.close(fd)  # its run removed that file as it ended: lock the new one
        except FileNotFoundError:  # removed meanwhile by a run that was ending: try again
            if fd is not None:
                os.close(fd)
        except OSError as error:  # no permission, or no file locks here (NFS without them, some FUSE mounts)
            raise SystemExit(f"error: cannot lock {lock} ({error.strerror}); pass an --out you can write, on a disk "
                             "with file locks.") from None
    HELD[lock] = fd
    atexit.register(release_lock, lock)
    text = read_text(fd)
    if text and not LOCK_TEXT.fullmatch(text):
        os.close(HELD.pop(lock))
        raise SystemExit(f"error: {lock} holds {text[:40]!r}, not a lock this project wrote; {clear}.")
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, f"pvdm run {os.getpid()}".encode())


def read_text(fd):
    """The start of an open file, as text."""
    os.lseek(fd, 0, os.SEEK_SET)
    return os.read(fd, 200).decode("ascii", "replace").strip()


def release_lock(lock):
    """Remove run.lock while still holding it (unless it is no longer ours), then let it go."""
    fd = HELD.pop(lock, None)
    if fd is not None:
        with contextlib.suppress(OSError):  # Windows keeps an open file: there run.lock stays, to be taken over
            if os.path.samestat(os.fstat(fd), os.lstat(lock)):
                os.remove(lock)
        os.close(fd)


def remove_stale_temporaries(out):
    """Temporary files of saves that died half-way (older versions put the host before the pid): in a folder this run
    has locked, no other run writes."""
    for name in os.listdir(out):
        if re.fullmatch(r".+\.pvdm-tmp\.(?:.+\.)?\d+", name, re.ASCII):
            with contextlib.suppress(OSError):
                os.remove(os.path.join(out, name))


def prepare_out(args, name, rank, world):
    """--out made safe to train in, and the checkpoint path OUT/name. Rank 0 locks the folder, removes stale
    temporary files and refuses to let a fresh run overwrite a checkpoint: --resume continues it, --start-over
    (in begin_training, once every input is checked) keeps it beside the new one. Every rank stops together."""
    path, message = os.path.join(args.out, name), None
    if rank == 0:
        try:
            make_out_dir(args.out)
            take_lock(args.out)
            remove_stale_temporaries(args.out)
            if not (args.resume or args.start_over) and os.path.exists(path):
                raise SystemExit(f"error: {path} already holds a trained checkpoint; pass --resume to continue it, "
                                 "--start-over to train a new one (the old one is kept beside it, renamed), or "
                                 "another --out.")
        except (SystemExit, OSError) as error:  # OSError: writing run.lock failed (a full disk)
            message = str(error).removeprefix("error: ")
    if world > 1:
        box = [message]
        dist.broadcast_object_list(box)
        message = box[0]
    if message:
        fail(message, world > 1)
    return path


def begin_training(args, path, rank):
    """Once every input is checked: --start-over sets the old checkpoint aside, renamed with the time (a typo in a flag
    never leaves the folder without one), and Ctrl-C ends the run in one line saying how to resume. Returns the check
    the loop makes at every step, for Ctrl-C in a finaliser (imageio closes files in __del__), which swallows exits."""
    if rank == 0 and args.start_over and os.path.exists(path):
        stem, ext = os.path.splitext(path)
        kept = f"{stem}.{time.strftime('%Y%m%d-%H%M%S')}{ext}"
        kept = f"{stem}.{time.time_ns()}{ext}" if os.path.exists(kept) else kept  # two start-overs within a second
        os.replace(path, kept)
        log(rank, args.out, f"--start-over: the old checkpoint is kept as {kept}")
    pressed = []

    def on_ctrl_c(signum, frame):
        pressed.append(True)
        while frame and frame.f_code.co_name != "__del__":
            frame = frame.f_back
        if frame is None:  # not in a finaliser: stop now
            interrupted(path, rank)
    signal.signal(signal.SIGINT, on_ctrl_c)
    return lambda: pressed and interrupted(path, rank)


def interrupted(path, rank):
    """Ctrl-C in training: what was kept, and the command that continues it."""
    if rank:
        raise SystemExit(1)  # rank 0 says it
    if not os.path.exists(path):
        raise SystemExit("interrupted before the first checkpoint, so nothing was kept; run the command again.")
    step = load_file(path, "the checkpoint", "train again")["step"]
    argv = [a for a in sys.argv if a != "--start-over"] + ["--resume"] * ("--resume" not in sys.argv)
    raise SystemExit(f"interrupted: the last checkpoint, {path}, holds step {step}; continue it with: "
                     f"python {shlex.join(argv)}")


def run_cleanly(main):
    """Run a script's main() so that Ctrl-C or an escaping OSError (a full disk, a removed folder) is one line."""
    try:
        main()
    except KeyboardInterrupt:
        raise SystemExit("interrupted.") from None
    except OSError as error:
        raise SystemExit(f"error: {error}; free some space or fix the path, then run again (training: --resume).")
