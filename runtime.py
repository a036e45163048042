"""
The run plumbing the scripts share, so each script stays one linear story: flags, device and DDP set-up,
precision, endless batches, the learning-rate schedule, the optimiser step, logging and progress lines,
checkpoint I/O, and the frame-change measure sample.py reports. A module, not a script: nothing runs here.
"""
import contextlib
import math
import os
import sys
import time
from dataclasses import asdict

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader

import data
import pvdm

# ----------------------------------------------------------------------------------------------
# Flags, start-up and precision
# ----------------------------------------------------------------------------------------------


def add_data_args(parser):
    """The data flags shared by the training and evaluation scripts."""
    parser.add_argument("--data", default="synthetic", choices=data.DATASETS,
                        help="synthetic needs no download; the others read --data-dir")
    parser.add_argument("--data-dir", default=None, help="root of the ucf101 / sky / folder data")
    parser.add_argument("--split", default="train", choices=data.SPLITS)
    parser.add_argument("--frame-stride", type=int, default=1, help="take every n-th frame")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    parser.add_argument("--num-shapes", type=int,
                        help="synthetic data only: shapes per video (default 1; 2 is a harder set, see the README)")
    return parser


def synthetic_options(args, trained=None):
    """make_dataset's options from the data flags: --num-shapes if given, else `trained`, the shapes per
    video a model was trained on (pass it for synthetic data only), else none (the set's default)."""
    num_shapes = args.num_shapes if args.num_shapes is not None else trained
    return {} if num_shapes is None else {"num_shapes": num_shapes}


def add_common_args(p, out, steps, batch_size):
    """Flags both training stages share. --batch-size is the global batch, split evenly over the ranks."""
    add_data_args(p)
    p.add_argument("--resolution", type=int, help="frame size (default: the preset's)")
    p.add_argument("--frames", type=int, help="frames per clip (default: the preset's)")
    p.add_argument("--batch-size", type=int, default=batch_size)
    p.add_argument("--steps", type=int, default=steps, help="optimiser steps in total")
    p.add_argument("--warmup", type=int, default=100, help="steps of linear learning-rate warm-up")
    p.add_argument("--lr-decay", choices=["cosine", "constant"], default="cosine",
                   help="after warm-up: cosine decay to zero at --steps, or a constant rate (the paper's)")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--grad-checkpointing", action="store_true",
                   help="recompute each block's activations in backward: less memory, more time")
    p.add_argument("--out", default=out, help="folder for the checkpoint, previews and log")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--save-every", type=int, default=500)
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")


def setup(args):
    """One process per device. Under torchrun, RANK/WORLD_SIZE/LOCAL_RANK are set and we join the group
    (nccl on CUDA, gloo on CPU); under plain python this is a world of one."""
    distributed = "RANK" in os.environ
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if args.device is None:
        args.device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
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
        loader = DataLoader(dataset, batch_size, sampler=mine[offset * batch_size:].tolist(),
                            num_workers=workers, drop_last=True, pin_memory=torch.cuda.is_available())
        for batch in loader:
            yield batch
            step += 1


def learning_rate(step, args):
    """The rate for optimiser step `step` (0-based): linear warm-up, then constant or cosine decay to 0.
    A pure function of the step, so a resumed run continues the same curve. Ending at a small rate settles
    the weights (see the README for what it gained the tiny autoencoder)."""
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


def check_finite(loss, step):
    if not torch.isfinite(torch.tensor(loss)):
        raise SystemExit(f"error: the loss became {loss} at step {step}; stopping without saving. The last "
                         "checkpoint is intact: resume from it with a lower --lr or --precision fp32.")


class Meter:
    """Throughput and memory for the log line."""

    def __init__(self, device, step, global_batch):
        self.device, self.start, self.step0, self.global_batch = device, time.time(), step, global_batch

    def line(self, step):
        rate = (step - self.step0) * self.global_batch / (time.time() - self.start)
        mem = ""
        if self.device.type == "cuda":
            mem = f" | peak mem {torch.cuda.max_memory_allocated(self.device) / 2**30:.1f} GB"
        return f"{rate:.1f} clips/s{mem}"


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
    """Write atomically: a run killed mid-save leaves the previous checkpoint intact, never half a file."""
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)  # atomic on POSIX and Windows


def load_checkpoint(path, kind):
    """Load a self-describing checkpoint (plain types only, so weights_only=True) and check its kind."""
    if not os.path.isfile(path):
        raise SystemExit(f"error: no {kind} checkpoint at {path}; train one first or pass the right path.")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("kind") != kind:
        found = ckpt.get("kind", "unknown") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise SystemExit(f"error: {path} holds a checkpoint of kind {found!r}, not {kind!r}; pass one that "
                         f"train_{kind}.py wrote.")
    return ckpt


def config_changes(saved, current):
    """Fields in which a checkpoint's config (a dict) differs from this run's dataclass config, read through the
    dataclass so a field added since reads at its default. Activation checkpointing trades memory for time
    and leaves the model as it is, so a resumed run may switch it."""
    there = asdict(type(current)(**saved))
    return [f"{key} {there[key]} there, {value} here" for key, value in asdict(current).items()
            if key != "grad_checkpointing" and there[key] != value]


def load_autoencoder(path, device="cpu"):
    """Rebuild a trained autoencoder from its checkpoint alone (config + weights), in eval mode."""
    return autoencoder_from_checkpoint(load_checkpoint(path, "autoencoder"), device)


def autoencoder_from_checkpoint(ckpt, device="cpu"):
    """The same, from a checkpoint already loaded (to read its other entries too)."""
    model = pvdm.ProjectedAutoencoder(pvdm.AutoencoderConfig(**ckpt["config"]))
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval()


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
    ucfg = pvdm.UNetConfig(**ckpt["unet_config"])
    ae_shape = (autoencoder.cfg.latent_channels, *autoencoder.cfg.latent_size)
    unet_shape = (ucfg.latent_channels, ucfg.frames, ucfg.size, ucfg.size)
    if ae_shape != unet_shape:
        raise SystemExit(f"error: {autoencoder_path} makes latents of shape (C, t, h, w) = {ae_shape}, but {path} "
                         f"denoises {unet_shape}; pass the autoencoder the diffusion model was trained with.")
    if pvdm.fingerprint(autoencoder) != ckpt["autoencoder"]["fingerprint"]:
        raise SystemExit(f"error: {path} was trained with a different autoencoder than {autoencoder_path} (weights "
                         "fingerprint differs); pass the one it was trained with.")
    unet = pvdm.TriplaneUNet(ucfg)
    unet.load_state_dict(ckpt["ema" if ema else "model"])
    diffusion = pvdm.GaussianDiffusion(unet, pvdm.DiffusionConfig(**ckpt["diffusion_config"]))
    return autoencoder, diffusion.to(device).eval(), ckpt["step"], autoencoder_path


def trained_num_shapes(ckpt):
    """Shapes per video of the synthetic clips a checkpoint's model was trained on; None for real data.
    Checkpoints from before --num-shapes existed record none, and were trained on two, the default then."""
    if "num_shapes" in ckpt:
        return ckpt["num_shapes"]
    return 2 if ckpt.get("args", {}).get("data") == "synthetic" else None


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
