"""
The run plumbing the scripts share, so each script stays one linear story: flags, device and DDP set-up,
precision, endless batches, the learning-rate schedule, the optimiser step, logging and progress lines,
checkpoint I/O, and the frame-change measure sample.py reports. A module, not a script: nothing runs here.
"""
import argparse
import atexit
import contextlib
import math
import os
import pickle
import re
import sys
import time
import warnings
from dataclasses import asdict

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader

import data
import pvdm

# ----------------------------------------------------------------------------------------------
# Flag types: every number and device is checked where it enters, the allowed range in the message
# ----------------------------------------------------------------------------------------------


def int_in(low, high=None):
    """An argparse type: a whole number in [low, high] (no upper end when high is None)."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low or high is not None and value > high:
            raise argparse.ArgumentTypeError(f"{value} is out of range; use a whole number "
                                             + (f"from {low} to {high}" if high is not None else f">= {low}"))
        return value
    return parse


def float_in(low=-math.inf, high=math.inf, open_low=False, open_high=False):
    """An argparse type: a finite number in the interval from low to high (ends excluded when open_*)."""
    interval = ("(" if open_low else "[") + f"{low:g}, {high:g}" + (")" if open_high else "]")
    def parse(text):
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        too_low, too_high = value < low or open_low and value == low, value > high or open_high and value == high
        if not math.isfinite(value) or too_low or too_high:
            raise argparse.ArgumentTypeError(f"{text} is out of range; use a finite number in {interval}")
        return value
    return parse


positive_int, non_negative_int, finite_float, probability = int_in(1), int_in(0), float_in(), float_in(0, 1)
learning_rate_value = float_in(0, 1, open_low=True)


def device_name(text):
    """An argparse type: cpu, cuda (under torchrun: this rank's GPU) or cuda:N."""
    if text in ("cpu", "cuda") or re.fullmatch(r"cuda:\d+", text):
        return text
    raise argparse.ArgumentTypeError(f"unknown device {text!r}; choose cpu, cuda or cuda:N")


def resolve_device(name):
    """The torch.device a --device value names (None: cuda when available), or one line saying why it cannot be
    used. 'cuda' means this process's GPU: cuda:LOCAL_RANK under torchrun, cuda:0 alone."""
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        name = f"cuda:{os.environ.get('LOCAL_RANK', 0)}"
    device, count = torch.device(name), torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device.type == "cuda" and device.index >= count:
        raise SystemExit(f"error: --device {name} asked for, but this torch sees {count} CUDA GPU(s); "
                         + ("use --device cpu." if count == 0 else f"use cuda:0 to cuda:{count - 1}."))
    return device


# ----------------------------------------------------------------------------------------------
# Flags, start-up and precision
# ----------------------------------------------------------------------------------------------


def add_data_args(parser):
    """The data flags shared by the training and evaluation scripts."""
    parser.add_argument("--data", default="synthetic", choices=data.DATASETS,
                        help=f"synthetic needs no download, footage needs `{data.FOOTAGE_INSTALL}`; the others read "
                             "--data-dir")
    parser.add_argument("--data-dir", default=None, help="root of the ucf101 / sky / folder data")
    parser.add_argument("--split", default="train", choices=data.SPLITS)
    parser.add_argument("--frame-stride", type=positive_int, default=1, help="take every n-th frame")
    parser.add_argument("--workers", type=non_negative_int, default=2, help="DataLoader worker processes")
    parser.add_argument("--num-shapes", type=int_in(1, 8),
                        help="synthetic data only: shapes per video (default 1; 2 is a harder set)")
    return parser


LAPTOP_DATA = ("synthetic", "footage")  # the quick starts' data, which the tiny presets are sized for


def parse_for_data(parser, argv, data_defaults):
    """Parse argv with the flag defaults `data_defaults` gives the chosen --data (if any) in place of the usual ones:
    each quick start runs with its own measured settings and no extra flag."""
    chosen = parser.parse_known_args(argv)[0].data
    parser.set_defaults(**data_defaults.get(chosen, {}))
    return parser.parse_args(argv)


def synthetic_options(args, trained=None):
    """make_dataset's options from the data flags: --num-shapes if given, else `trained`, the shapes per
    video a model was trained on (pass it for synthetic data only), else none (the set's default)."""
    num_shapes = args.num_shapes if args.num_shapes is not None else trained
    return {} if num_shapes is None else {"num_shapes": num_shapes}


def add_common_args(p, out, steps, batch_size):
    """Flags both training stages share. --batch-size is the global batch, split evenly over the ranks."""
    add_data_args(p)
    p.add_argument("--resolution", type=int_in(1, 1024), help="frame size (default: the preset's)")
    p.add_argument("--frames", type=int_in(1, 1024), help="frames per clip (default: the preset's)")
    p.add_argument("--batch-size", type=positive_int, default=batch_size)
    p.add_argument("--steps", type=positive_int, default=steps, help="optimiser steps in total")
    p.add_argument("--warmup", type=non_negative_int, default=100, help="steps of linear learning-rate warm-up")
    p.add_argument("--lr-decay", choices=["cosine", "constant"], default="cosine",
                   help="after warm-up: cosine decay to zero at --steps, or a constant rate (the paper's)")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--grad-checkpointing", action="store_true",
                   help="recompute each block's activations in backward: less memory, more time")
    p.add_argument("--out", default=out, help="folder for the checkpoint, previews and log")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    p.add_argument("--start-over", action="store_true",
                   help="train afresh although --out holds a checkpoint; the old one is kept beside it, renamed")
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--log-every", type=positive_int, default=50)
    p.add_argument("--save-every", type=positive_int, default=500)
    p.add_argument("--device", type=device_name, help="cpu, cuda or cuda:N (default: cuda when available)")


def setup(args):
    """One process per device. Under torchrun, RANK/WORLD_SIZE/LOCAL_RANK are set and we join the group
    (nccl on CUDA, gloo on CPU); under plain python this is a world of one."""
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


def rng_states(device, world):
    """Every rank's random state (CPU, and its GPU's on CUDA), for the checkpoint: a run resumed from it draws the
    same noise, timesteps and conditioning choices as one that never stopped. Called on all ranks."""
    state = [torch.get_rng_state()] + ([torch.cuda.get_rng_state(device)] if device.type == "cuda" else [])
    states = [state] * world
    if world > 1:
        dist.all_gather_object(states, state)
    return states


def restore_rng(states, rank, device):
    """Continue the random streams a checkpoint saved; one from another number of ranks keeps the fresh seed."""
    if states is not None and len(states) > rank:
        torch.set_rng_state(states[rank][0])
        if device.type == "cuda" and len(states[rank]) > 1:
            torch.cuda.set_rng_state(states[rank][1], device)


def wrap_ddp(model, device, world):
    """The model in DistributedDataParallel under torchrun (gradients averaged over the ranks); alone, as it is."""
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else model


def teardown(world):
    """Leave the process group at the end, so torchrun sees every rank finish cleanly."""
    if world > 1:
        dist.destroy_process_group()


def fail(message, distributed=False):
    """A user error found at start-up: one line, and a clean exit on every rank."""
    if distributed:
        dist.destroy_process_group()
    raise SystemExit(f"error: {message}")


def autocast(device, precision):
    """The one mixed-precision context of every forward pass; a no-op in fp32. device: a torch.device or its type."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


# ----------------------------------------------------------------------------------------------
# Training: batches, learning rate, the optimiser step
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
    """The rate for optimiser step `step` (0-based): linear warm-up, then constant or cosine decay to 0.
    A pure function of the step, so a resumed run continues the same curve. Ending at a small rate settles
    the weights: the tiny autoencoder ends sharper than at a constant rate."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    if args.lr_decay == "constant":
        return args.lr
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * 0.5 * (1 + math.cos(math.pi * progress))


def optimizer_step(loss, opt, scaler, lr):
    """Backward, then one step at rate lr. The scaler scales the loss in fp16 only (a no-op otherwise)."""
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    for group in opt.param_groups:
        group["lr"] = lr
    scaler.step(opt)
    scaler.update()


# ----------------------------------------------------------------------------------------------
# Logging and progress
# ----------------------------------------------------------------------------------------------


def mean_over_ranks(value, world):
    """The logged loss is the average over all ranks, not rank 0's alone."""
    value = value.detach().float().clone()
    if world > 1:
        dist.all_reduce(value)
    return value.item() / world


def nonfinite(tree):
    """The name of the first floating tensor holding NaN or inf in a module or a (nested) checkpoint dict, or None."""
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
    """Stop at a non-finite loss, and, given the modules about to be saved, at non-finite weights: the loss is
    computed before the optimiser step, so a finite loss can still leave NaN weights behind, and those must never
    replace a good checkpoint. Every rank checks (the weights are the same on all), so all stop together."""
    bad = None if math.isfinite(loss) else f"the loss became {loss}"
    for module in modules:
        name = bad is None and nonfinite(module)
        bad = bad or name and f"the weights became non-finite ({name})"
    if bad:
        raise SystemExit(f"error: {bad} at step {step}; stopping without saving. {what_is_left(ckpt_path)}")


class Meter:
    """Throughput and memory for the log line, and once, a few steps in, the projected time to --steps."""

    def __init__(self, device, step, args, say):
        self.device, self.start, self.step0, self.global_batch = device, time.time(), step, args.batch_size
        self.total, self.say, self.first, self.said = args.steps, say, None, False  # first: (step, time) at step 1
        self.hint = ("; the paper preset on a CPU takes days: --preset tiny trains a small model in minutes"
                     if device.type == "cpu" and args.preset == "paper" else "")

    def line(self, step):
        rate = (step - self.step0) * self.global_batch / (time.time() - self.start)
        mem = ""
        if self.device.type == "cuda":
            mem = f" | peak mem {torch.cuda.max_memory_allocated(self.device) / 2**30:.1f} GB"
        return f"{rate:.1f} clips/s{mem}"

    def project(self, step):
        """Says once, after 5 steps or 30 s (timed from the end of the first step, so start-up does not count),
        how long the run will take to reach --steps at this pace."""
        if self.first is None:
            self.first = (step, time.time())
            return
        done, spent = step - self.first[0], time.time() - self.first[1]
        if self.said or not (done >= 5 or done and spent >= 30) or step >= self.total:
            return
        left = spent / done * (self.total - step)
        days = f" ({left / 86400:.1f} days)" if left >= 86400 else ""
        self.say(f"projected: {fmt_time(left)}{days} more to step {self.total}, at {spent / done:.2f} s per "
                 f"step{self.hint}")
        self.said = True


def log(rank, out, text):
    """Rank 0 prints and appends to OUT/log.txt."""
    if rank == 0:
        print(text, flush=True)
        with open(os.path.join(out, "log.txt"), "a") as f:
            f.write(text + "\n")


def say_if_done(rank, args, ckpt_path, step):
    """A resumed run already at --steps trains nothing: one line says so, rather than a silent exit."""
    if step >= args.steps:
        log(rank, args.out, f"{ckpt_path} is already at step {step} of --steps {args.steps}; pass a larger --steps "
            "to train on.")


def fmt_time(seconds):
    minutes, seconds = divmod(int(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{seconds:02d}" if minutes >= 60 else f"{minutes}:{seconds:02d}"


class Progress:
    """A status line on stderr with time spent and time left, for `total` units of work. On a terminal it is
    one line rewritten in place; in a log file or a pipe, a plain line every `every` seconds or every tenth
    of the work (and at the end), never one per step."""

    def __init__(self, total, stream=None, every=10.0):
        self.stream = stream or sys.stderr
        self.total, self.every, self.tty = total, every, self.stream.isatty()
        self.done, self.start = 0, time.time()
        self.shown_at, self.shown_done = self.start, 0  # when, and after how much work, a plain line was last written

    def advance(self, status, n=1):
        """n more units done; `status` says where we are."""
        self.done += n
        now = time.time()
        left = (now - self.start) / self.done * (self.total - self.done)
        line = f"{status} | {fmt_time(now - self.start)} elapsed, ~{fmt_time(left)} left"
        if self.tty:
            self.stream.write(f"\r{line} ")
        elif (now - self.shown_at >= self.every or self.done - self.shown_done >= self.total / 10
              or self.done >= self.total):
            self.stream.write(line + "\n")
            self.shown_at, self.shown_done = now, self.done
        self.stream.flush()

    def close(self):
        """Ends the rewritten line, so what is printed next starts on a line of its own."""
        if self.tty and self.done:
            self.stream.write("\n")
            self.stream.flush()


# ----------------------------------------------------------------------------------------------
# Checkpoints: self-describing, plain types, written atomically
# ----------------------------------------------------------------------------------------------


def save_checkpoint(obj, path):
    """Write atomically: a run killed mid-save leaves the previous checkpoint intact, never half a file. Refuses
    NaN or inf anywhere in obj, so a blown-up model never replaces a good checkpoint, and answers a full disk in one
    line, removing its temporary file."""
    bad = nonfinite(obj)
    if bad is not None:
        raise SystemExit(f"error: not writing {path}: {bad} holds NaN or inf. {what_is_left(path)}")
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)  # atomic on POSIX and Windows
    except (OSError, RuntimeError) as error:  # torch reports a full disk as a RuntimeError
        with contextlib.suppress(OSError):
            os.remove(tmp)
        reason = getattr(error, "strerror", None) or "the disk may be full, or the folder not writable"
        raise SystemExit(f"error: could not write {path} ({reason}). "
                         f"{what_is_left(path, 'once there is space, or with another --out')}") from None


def load_file(path, what, fix):
    """The one way a checkpoint or cache is read: torch.load with weights_only=True, so only tensors and plain
    values come back and a hostile pickle never runs. A missing, empty, truncated, foreign or hostile file is
    answered in one line naming it and `fix`, what to do."""
    path = str(path)
    if os.path.isdir(path):
        problem = "is a folder, not a file"
    elif not os.path.isfile(path):
        problem = "does not exist"
    elif os.path.getsize(path) == 0:
        problem = "is empty"
    else:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch warns before failing on some foreign files
                return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:  # torch's own message here suggests weights_only=False: never do that
            problem = "holds more than tensors and plain values (foreign, damaged or hostile), so it was not unpickled"
        except Exception:  # zip and OS errors of truncated or damaged files
            problem = "cannot be read (it is truncated, damaged or not a PyTorch file)"
    raise SystemExit(f"error: {what} {path} {problem}; {fix}.")


# What every checkpoint of a kind holds, and what resuming from it needs besides.
CHECKPOINT_KEYS = {"autoencoder": ("config", "model"),
                   "diffusion": ("unet_config", "diffusion_config", "model", "ema", "autoencoder")}


def load_checkpoint(path, kind, resume=False):
    """Load a self-describing checkpoint (plain types only, so weights_only=True) and check its kind and keys."""
    if not os.path.exists(path):
        raise SystemExit(f"error: no {kind} checkpoint at {path}; train one first or pass the right path.")
    fix = f"pass a checkpoint that train_{kind}.py wrote"
    ckpt = load_file(path, f"the {kind} checkpoint", fix)
    if not isinstance(ckpt, dict) or ckpt.get("kind") != kind:
        found = ckpt.get("kind", "unknown") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise SystemExit(f"error: {path} holds a checkpoint of kind {found!r}, not {kind!r}; {fix}.")
    missing = [k for k in CHECKPOINT_KEYS[kind] + (("optimizer", "step") if resume else ()) if k not in ckpt]
    if missing:
        raise SystemExit(f"error: {path} lacks {', '.join(missing)}, so it is incomplete; {fix}.")
    return ckpt


def rebuilt(path, build):
    """build() a model from a loaded checkpoint, answering a config or weights this code cannot use in one line."""
    try:
        return build()
    except (TypeError, ValueError, RuntimeError, KeyError) as error:
        raise SystemExit(f"error: {path} holds a config or weights this code cannot rebuild a model from "
                         f"({str(error).splitlines()[0][:200]}); pass a checkpoint this version wrote.") from None


def config_changes(saved, current):
    """Fields in which a checkpoint's config (a dict) differs from this run's dataclass config, read through the
    dataclass so a field added since reads at its default. Activation checkpointing trades memory for time
    and leaves the model as it is, so a resumed run may switch it."""
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
    """A trained diffusion model (its EMA weights unless ema=False) and the autoencoder it was trained with (by
    default the one its checkpoint records), in eval mode, refusing a pair that does not belong together: the
    autoencoder's latents would be noise to the UNet. Returns (autoencoder, diffusion, step, autoencoder path)."""
    ckpt = load_checkpoint(path, "diffusion")
    autoencoder_path = autoencoder_path or ckpt["autoencoder"]["path"]
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


def check_same_autoencoder(path, record, autoencoder, autoencoder_path):
    """Refuse an autoencoder other than the one a diffusion checkpoint records (its `record`, path + fingerprint):
    its latents would be noise to the UNet. Used by sample.py and by resuming stage 2."""
    if pvdm.fingerprint(autoencoder) != record["fingerprint"]:
        raise SystemExit(f"error: {path} was trained with a different autoencoder than {autoencoder_path} (weights "
                         f"fingerprint differs); pass the one it was trained with, {record['path']} when it was "
                         "saved (a --start-over run keeps the old one beside the new, renamed with the time).")


def trained_num_shapes(ckpt):
    """Shapes per video of the synthetic clips a checkpoint's model was trained on; None for real data.
    Checkpoints from before --num-shapes existed record none, and were trained on two, the default then."""
    if "num_shapes" in ckpt:
        return ckpt["num_shapes"]
    return 2 if ckpt.get("args", {}).get("data") == "synthetic" else None


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


def pid_alive(pid):
    """Whether process `pid` runs on this machine (Windows cannot be asked without risk: there, assume it does)."""
    if pid <= 0 or os.name == "nt":
        return pid > 0
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, run by another user
    return True


def check_out_dir(out, names, formats, overwrite):
    """Refuse a folder holding videos of another run (evaluate.py would mix them into the statistics), and, unless
    --overwrite, videos of the names this run writes: an earlier run's samples are never replaced silently."""
    ours = {f"{name}.{fmt}" for name in names for fmt in formats}
    videos = sorted(f for f in os.listdir(out) if f.endswith((".mp4", ".gif")))
    stale, same = [f for f in videos if f not in ours], [f for f in videos if f in ours]
    if stale:
        raise SystemExit(f"error: {out} already holds {len(stale)} other video(s) such as {stale[0]}; "
                         "pick an empty --out or remove them.")
    if same and not overwrite:
        raise SystemExit(f"error: {out} already holds {len(same)} video(s) of the names this run writes, such as "
                         f"{same[0]}; pass --overwrite to replace them, or another --out.")


def take_lock(out):
    """One run per folder: OUT/run.lock holds the pid of the run using it, created atomically (O_CREAT | O_EXCL),
    removed at exit. A lock whose process is gone (a killed run) is stale and taken over, so kill -9 never leaves
    the folder stuck."""
    lock = os.path.join(out, "run.lock")
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                text, age = open(lock).read().strip(), time.time() - os.path.getmtime(lock)
            except FileNotFoundError:
                continue  # released meanwhile
            pid = int(text) if text.isdigit() else None
            if pid is None and age < 10 or pid not in (None, os.getpid()) and pid_alive(pid):  # empty: being written
                raise SystemExit(f"error: another run (pid {pid or 'unknown'}) is using {out}; wait for it to finish, "
                                 f"or pass another --out (if no such run exists, delete {lock}).")
            with contextlib.suppress(FileNotFoundError):
                os.remove(lock)  # stale: its run is gone
            continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        atexit.register(release_lock, lock)
        return
    raise SystemExit(f"error: could not take {lock}; another run is starting on {out}: pass another --out.")


def release_lock(lock):
    with contextlib.suppress(OSError):
        if open(lock).read().strip() == str(os.getpid()):
            os.remove(lock)


def remove_stale_temporaries(out):
    """Temporary files (name.tmp<pid>) of saves that died half-way: nothing else removes them."""
    for name in os.listdir(out):
        found = re.search(r"\.tmp(\d+)$", name)
        if found and (int(found.group(1)) == os.getpid() or not pid_alive(int(found.group(1)))):
            with contextlib.suppress(OSError):
                os.remove(os.path.join(out, name))


def prepare_out(args, name, rank, world):
    """--out made safe to train in, and the checkpoint path OUT/name. Rank 0 locks the folder, removes stale
    temporary files and refuses to let a fresh run overwrite a checkpoint: --resume continues it, --start-over
    keeps it beside the new one, renamed with the time. Every rank stops together on a refusal."""
    path, message = os.path.join(args.out, name), None
    if rank == 0:
        try:
            kept = claim_out(args, path)
            if kept:
                log(rank, args.out, f"--start-over: the old checkpoint is kept as {kept}")
        except SystemExit as error:
            message = str(error).removeprefix("error: ")
    if world > 1:
        box = [message]
        dist.broadcast_object_list(box)
        message = box[0]
    if message:
        fail(message, world > 1)
    return path


def claim_out(args, path):
    """prepare_out on rank 0; returns where --start-over put the old checkpoint, or None."""
    if args.resume and args.start_over:
        raise SystemExit("error: --resume continues the checkpoint in --out and --start-over sets it aside; pass one.")
    make_out_dir(args.out)
    take_lock(args.out)
    remove_stale_temporaries(args.out)
    if args.resume or not os.path.exists(path):
        return None
    if not args.start_over:
        raise SystemExit(f"error: {path} already holds a trained checkpoint; pass --resume to continue it, "
                         "--start-over to train a new one (the old one is kept beside it, renamed), or another --out.")
    stem, ext = os.path.splitext(path)
    kept = f"{stem}.{time.strftime('%Y%m%d-%H%M%S')}{ext}"
    kept = f"{stem}.{time.time_ns()}{ext}" if os.path.exists(kept) else kept  # two start-overs within a second
    os.replace(path, kept)
    return kept


def run_main(main):
    """A script's entry point: an OSError that escapes main (a full disk, a folder removed under a running job)
    ends in one line, not a traceback."""
    try:
        main()
    except OSError as error:
        raise SystemExit(f"error: {error}; free some space or fix the path, then run again (training: --resume).")


# ----------------------------------------------------------------------------------------------
# Frame-change measure of sampled videos
# ----------------------------------------------------------------------------------------------


class Continuity:
    """How much consecutive frames differ (mean absolute difference, grey levels 0-255), kept apart for pairs
    inside a clip and pairs across a clip boundary. A model that continues its previous clip makes the two
    alike; one that starts each clip afresh jumps at every boundary."""

    def __init__(self):
        self.sums = {"within": 0.0, "across": 0.0}
        self.counts = {"within": 0, "across": 0}
        self.last = {}  # video name -> its latest frame, until forget()

    def add(self, video, frames):
        """frames (<=T, H, W, 3) uint8: the next clip of the video named `video`."""
        frames = frames.astype(np.float64)
        diffs = {"within": np.abs(np.diff(frames, axis=0)).mean(axis=(1, 2, 3))}  # (<=T - 1,)
        if video in self.last:
            diffs["across"] = np.abs(frames[0] - self.last[video]).mean(keepdims=True)
        self.last[video] = frames[-1].astype(np.uint8)
        for key, d in diffs.items():
            self.sums[key] += d.sum()
            self.counts[key] += d.size

    def forget(self, videos):
        """Drop the last frames of finished videos, so memory does not grow with --num-videos."""
        for video in videos:
            self.last.pop(video, None)

    def means(self):
        """{"within": mean change inside clips, "across": mean change at clip boundaries}, None where unseen."""
        return {k: self.sums[k] / self.counts[k] if self.counts[k] else None for k in self.sums}
