"""The run plumbing the scripts share, so each stays one linear story: set-up, batches, the
learning rate, logging, checkpoints and `Run`, the object a trainer's main() holds. Below the marked
line: what keeps runs safe (flag, memory and NaN checks, exact resumption, the lock)."""
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


# ---- Set-up: device, processes, precision


def init_process(args):
    """(rank, world, device), in torchrun's group; sets args.device, .precision and the seed."""
    distributed = "RANK" in os.environ
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = settle_device(args)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if distributed:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if args.batch_size < world or args.batch_size % world:
        fail(f"--batch-size {args.batch_size} cannot be split evenly over {world} processes; "
             f"use a multiple of {world}.", distributed)
    torch.manual_seed(args.seed + rank)  # each rank draws its own noise
    return rank, world, device


def mean_over_ranks(value, world):
    """The logged loss is the average over all ranks, not rank 0's alone."""
    value = value.detach().float().clone()
    if world > 1:
        dist.all_reduce(value)
    return value.item() / world


def autocast(device, precision):
    """The one mixed-precision context of every forward pass; a no-op in fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(torch.device(device).type, dtype=dtype)


# ---- Batches, the learning rate, logging


def batches(dataset, batch_size, rank, world, seed, start_step, workers):
    """Endless batches for this rank, ordered by (seed, epoch) alone: a resumed run goes on
    exactly where the killed one stopped."""
    per_epoch = len(dataset) // (batch_size * world)
    if per_epoch == 0:
        fail(f"the dataset has {len(dataset)} clips, fewer than one global "
             f"batch of {batch_size * world}; lower --batch-size.")
    step = start_step
    while True:
        epoch, offset = divmod(step, per_epoch)
        if hasattr(dataset, "set_epoch"):  # this epoch's clip start frames
            dataset.set_epoch(epoch)
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed + epoch))
        mine = order[: per_epoch * batch_size * world][rank::world]  # this rank's share
        loader = DataLoader(dataset, batch_size, sampler=mine[offset * batch_size:].tolist(),
                            num_workers=workers, drop_last=True,
                            pin_memory=torch.cuda.is_available(),
                            generator=torch.Generator().manual_seed(seed + epoch))
        try:
            for batch in loader:
                yield batch
                step += 1
        except data.DataError as error:  # from a worker: the dataset's line comes last
            line = str(error).splitlines()[-1].removeprefix("data.DataError: ")
            fail(line)


def learning_rate(step, args):
    """The rate of step `step` (from 0): linear warm-up, then constant or cosine decay to 0."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    if args.lr_decay == "constant":
        return args.lr
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * 0.5 * (1 + math.cos(math.pi * progress))


def log(rank, out, text):
    """Rank 0 prints and appends to OUT/log.txt."""
    if rank == 0:
        print(text, flush=True)
        with open(os.path.join(out, "log.txt"), "a") as f:
            f.write(text + "\n")


class TrainingMeter:
    """The log line's clips/s and peak GPU memory, and once, the projected time to --steps."""

    def __init__(self, device, step, args, say):
        self.device, self.args, self.say, self.step0 = device, args, say, step
        self.start, self.first, self.said = time.time(), None, False  # first: (step, time)

    def line(self, step):
        rate = (step - self.step0) * self.args.batch_size / (time.time() - self.start)
        peak = (f" | peak mem {torch.cuda.max_memory_allocated(self.device) / 2**30:.1f} GB"
                if self.device.type == "cuda" else "")
        return f"{rate:.1f} clips/s{peak}"

    def project(self, step):  # once, 5 steps or 30 s after the first (start-up does not count)
        self.first = self.first or (step, time.time())
        done, spent, total = step - self.first[0], time.time() - self.first[1], self.args.steps
        if self.said or not (done >= 5 or done and spent >= 30) or step >= total:
            return
        left, self.said = spent / done * (total - step), True
        days = f" ({left / 86400:.1f} days)" if left >= 86400 else ""
        hint = ("; the paper preset on a CPU takes days: --preset tiny takes minutes"
                if self.device.type == "cpu" and self.args.preset == "paper" else "")
        self.say(f"projected: {data.fmt_time(left)}{days} more to step {total}, at "
                 f"{spent / done:.2f} s per step{hint}")


# ---- Checkpoints: self-describing, plain types, written atomically


def save_checkpoint(obj, path, then=None):
    """Write atomically, never NaN over a good model; a full disk is one line, no temporary."""
    bad = nonfinite(obj)
    if bad is not None:
        fail(f"not writing {path}: {bad} holds NaN or inf. {what_is_left(path, then or LOWER_LR)}")
    tmp = f"{path}.pvdm-tmp.{os.getpid()}"  # see remove_stale_temporaries
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)  # atomic on POSIX and Windows
    except (OSError, RuntimeError) as error:  # a full disk is a RuntimeError in torch
        with contextlib.suppress(OSError):
            os.remove(tmp)
        why = getattr(error, "strerror", None) or "the disk may be full, or the folder read-only"
        left = what_is_left(path, "once there is space, or with another --out")
        fail(f"could not write {path} ({why}). {left}")


def load_checkpoint(path, kind, resume=False):
    """A checkpoint of `kind`, its keys checked."""
    if not os.path.exists(path):
        aside = set_aside(path)
        fail(f"no {kind} checkpoint at {path}; train one first or pass the right path" + (
            f" (--start-over set {aside} aside: rename it to {path} to resume it)." if aside
            else "."))
    fix = f"pass a checkpoint that train_{kind}.py wrote"
    ckpt = load_file(path, f"the {kind} checkpoint", fix)
    if not isinstance(ckpt, dict) or ckpt.get("kind") != kind:
        found = ckpt.get("kind", "unknown") if isinstance(ckpt, dict) else type(ckpt).__name__
        fail(f"{path} holds a checkpoint of kind {found!r}, not {kind!r}; {fix}.")
    wanted = CHECKPOINT_KEYS[kind] | (RESUME_KEYS if resume else {})
    missing = [k for k in wanted if entry(ckpt, k) is None]
    wrong = [k for k, kind_of in wanted.items() if not isinstance(entry(ckpt, k), kind_of)]
    if wrong:
        fail(f"{path} " + (f"lacks {', '.join(missing)}, so it is incomplete" if missing else
                           f"holds {', '.join(wrong)} of the wrong type, so it is damaged")
             + f"; {fix}.")
    return ckpt


def load_autoencoder(path, device="cpu"):
    """A trained autoencoder rebuilt from its checkpoint alone, in eval mode."""
    return autoencoder_from_checkpoint(load_checkpoint(path, "autoencoder"), device, path)


def autoencoder_from_checkpoint(ckpt, device="cpu", path="the checkpoint"):
    """The same, from a loaded checkpoint."""
    def build():
        model = pvdm.ProjectedAutoencoder(pvdm.AutoencoderConfig(**ckpt["config"]))
        model.load_state_dict(ckpt["model"])
        return model
    return rebuilt(path, build).to(device).eval()


def load_diffusion(path, device, autoencoder_path=None, ema=True):
    """(autoencoder, diffusion (EMA weights unless ema=False), step, autoencoder path): a pair
    checked to fit, in eval mode."""
    ckpt = load_checkpoint(path, "diffusion")
    ae_path = autoencoder_path or recorded_autoencoder(path, ckpt["autoencoder"]["path"])
    if not ema and not isinstance(ckpt.get("model"), dict):
        fail(f"{path} holds EMA weights only (exported); drop --no-ema.")
    if not os.path.isfile(ae_path):
        fail(f"no autoencoder at {ae_path} " + (
            "(--autoencoder); pass one train_autoencoder.py wrote." if autoencoder_path else
            f"(the one {path} was trained with); pass its path with --autoencoder."))
    autoencoder = load_autoencoder(ae_path, device)
    check_same_autoencoder(path, ckpt["autoencoder"], autoencoder, ae_path)
    dcfg = rebuilt(path, lambda: pvdm.DiffusionConfig(**ckpt["diffusion_config"]))
    if not 0 <= dcfg.overlap < autoencoder.cfg.frames:
        fail(f"{path} records an overlap of {dcfg.overlap} frames, not 0 to "
             f"{autoencoder.cfg.frames - 1}, so it is damaged; pass another.")
    weights = "ema" if ema else "model"
    diffusion = rebuilt(path, lambda: pvdm.GaussianDiffusion(
        pvdm.TriplaneUNet(pvdm.UNetConfig(**ckpt["unet_config"])), dcfg))
    rebuilt(path, lambda: diffusion.model.load_state_dict(ckpt[weights]))
    for name, module in ((ae_path, autoencoder), (f"{path} ({weights} weights)", diffusion)):
        if nonfinite(module) is not None:
            fail(f"{name} holds NaN or inf weights; use an earlier checkpoint or train again.")
    return autoencoder, diffusion.to(device).eval(), ckpt.get("step", 0), ae_path


def recorded_autoencoder(path, recorded):
    """The recorded autoencoder, or the file of its name beside `path` (a folder moved whole)."""
    beside = os.path.join(os.path.dirname(path), os.path.basename(recorded))
    return beside if not os.path.isfile(recorded) and os.path.isfile(beside) else recorded


def recorded_preset(ckpt):
    """The preset a checkpoint's args record, or None."""
    args = ckpt.get("args") if isinstance(ckpt, dict) else None
    preset = args.get("preset") if isinstance(args, dict) else None
    return preset if preset in pvdm.PRESETS else None


def export_model(path, out):
    """OUT/autoencoder.pt and OUT/diffusion.pt as shipped: weights only (EMA), in fp16."""
    ckpt = load_checkpoint(path, "diffusion")
    ae = load_checkpoint(recorded_autoencoder(path, ckpt["autoencoder"]["path"]), "autoencoder")
    half = lambda state: {k: v.half() if v.is_floating_point() else v  # noqa: E731
                          for k, v in state.items()}
    os.makedirs(out, exist_ok=True)
    ae = {"kind": "autoencoder", "config": ae["config"], "step": ae.get("step", 0),
          "args": {"preset": recorded_preset(ae)}, "model": half(ae["model"])}
    record = {"path": os.path.join(out, "autoencoder.pt"),
              "fingerprint": pvdm.fingerprint(autoencoder_from_checkpoint(ae))}
    save_checkpoint(ae, record["path"])
    keep = ("kind", "unet_config", "diffusion_config", "step")
    save_checkpoint({k: ckpt[k] for k in keep} | {"ema": half(ckpt["ema"]), "autoencoder": record},
                    os.path.join(out, "diffusion.pt"))
    print(f"wrote {out}/autoencoder.pt and diffusion.pt (EMA weights of step {ckpt['step']}, fp16)")


# ---- A training run: what a trainer's main() calls, so its loop shows only the model's work


class Run:
    """One training run of `kind`: device, locked --out, the checkpoint to resume, stage 2's
    frozen autoencoder, the log and the end of each step."""

    def __init__(self, args, kind):
        self.args, self.kind = args, kind
        self.rank, self.world, self.device = init_process(args)
        self.path = prepare_out(args, f"{kind}.pt", self.rank, self.world)
        self.ckpt = load_checkpoint(self.path, kind, resume=True) if args.resume else {}
        self.step = self.ckpt.get("step", 0)
        if kind == "diffusion":  # stage 2 learns on stage 1's latents
            self.autoencoder = frozen_autoencoder(self, args.autoencoder)

    def fail(self, message):
        fail(message, self.world > 1)

    def log(self, text):
        log(self.rank, self.args.out, text)

    def load(self, configs, trained, **states):
        """On --resume, refuses other configs ({key: config}), loads `states` (model=...) and the
        random streams. Per {scaler key: module} of `trained`: (module, in DDP under torchrun;
        fp16's loss scaler)."""
        states = {key: value for key, value in states.items() if value is not None}
        size = checkpoint_bytes(states.values())
        if size > 2**31:
            self.log(f"disk: each save writes about {size / 2**30:.1f} GB to {self.path}")
        if self.args.resume:
            check_configs(self, configs)
            for key, target in states.items():
                if key in self.ckpt:  # load_checkpoint checked those every run has
                    rebuilt(self.path, lambda: target.load_state_dict(self.ckpt[key]))
            restore_rng(self)
        ids = [self.device.index] if self.device.type == "cuda" else None
        wrap = lambda m: DDP(m, device_ids=ids) if self.world > 1 and m is not None else m  # noqa
        return [(wrap(module), self.scaler(self.ckpt.get(key))) for key, module in trained.items()]

    def scaler(self, state):
        scaler = torch.amp.GradScaler(self.device.type, enabled=self.args.precision == "fp16")
        if state and scaler.is_enabled():
            rebuilt(self.path, lambda: scaler.load_state_dict(state))
        return scaler

    def start(self, dataset, recipe, sized_step):
        """This rank's batches, once the recipe is said and memory checked; only then does
        --start-over set the old checkpoint aside."""
        args = self.args
        self.log(f"recipe (preset {args.preset}): " + ", ".join(
            f"{key} {getattr(args, key)}" for key in recipe) + f", precision {args.precision}")
        if self.step >= args.steps:
            self.log(f"{self.path} is already at step {self.step}; pass a larger --steps.")
        need = check_fits(args, self.device, self.world, sized_step)
        if need:
            self.log(f"memory: about {need / 2**30:.1f} GB per training step at batch "
                     f"{args.batch_size // self.world} per process (estimated on fake tensors)")
        self.stop_if_interrupted = begin_training(args, self.path, self.rank)
        self.meter = TrainingMeter(self.device, self.step, args, say=self.log)
        return batches(dataset, args.batch_size // self.world, self.rank, self.world, args.seed,
                       self.step, args.workers)

    def set_learning_rate(self, *optimizers):
        """This step's learning rate into the optimisers."""
        self.stop_if_interrupted()  # Ctrl-C in a finaliser (see begin_training)
        for group in (g for opt in optimizers for g in opt.param_groups):
            group["lr"] = learning_rate(self.step, self.args)

    def end_step(self, loss, modules, **more):
        """Count the step, stop on NaN, log; True when rank 0 is to save now."""
        args, self.step = self.args, self.step + 1
        losses = {k: mean_over_ranks(v, self.world) for k, v in {"loss": loss, **more}.items()}
        saving = self.step % args.save_every == 0 or self.step == args.steps
        check_finite(self, losses, modules if saving else [])
        self.rng = rng_states(self) if saving else None
        self.meter.project(self.step)
        if self.step % args.log_every == 0 or self.step == args.steps:
            shown = " | ".join(f"{name} {value:.4f}" for name, value in losses.items())
            self.log(f"step {self.step:6d} | {shown} | lr {learning_rate(self.step - 1, args):.2e}"
                     f" | {self.meter.line(self.step)}")
        return saving and self.rank == 0

    def save(self, ckpt):
        """Write the checkpoint atomically, with the step, args and random state."""
        save_checkpoint({"kind": self.kind, **ckpt, "step": self.step, "args": vars(self.args),
                         "rng": self.rng}, self.path, remedy(self.args))

    def finish(self):
        """Leave the process group: torchrun sees every rank finish cleanly."""
        if self.world > 1:
            dist.destroy_process_group()


# ==== A first reading can stop here: what follows keeps runs safe, and changes nothing learnt

# ---- Flags: every number and device is checked where it enters


def number_in(kind, low=-math.inf, high=math.inf, open_low=False, open_high=False):
    """An argparse type: a finite int or float from low to high (an end out if open_*)."""
    name = "whole number" if kind is int else "finite number"
    ends = "(" if open_low else "[", ")" if open_high else "]"
    allowed = ((f"from {low} to {high}" if high < math.inf else f">= {low}") if kind is int else
               f"in {ends[0]}{low:g}, {high:g}{ends[1]}")

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {name.split()[-1]}") from None
        outside = not (math.isfinite(value) and low <= value <= high)
        if outside or value == low and open_low or value == high and open_high:
            raise argparse.ArgumentTypeError(f"{text} is out of range; use a {name} {allowed}")
        return value
    return parse


int_in = lambda low, high=math.inf: number_in(int, low, high)  # noqa: E731
float_in = partial(number_in, float)
positive_int, non_negative_int, probability = int_in(1), int_in(0), float_in(0, 1)
finite_float, learning_rate_value = float_in(), float_in(0, 1, open_low=True)


def device_name(text):
    """An argparse type: cpu, cuda (under torchrun: this rank's GPU) or cuda:N."""
    if text in ("cpu", "cuda") or re.fullmatch(r"cuda:\d+", text):
        return text
    raise argparse.ArgumentTypeError(f"unknown device {text!r}; choose cpu, cuda or cuda:N")


def resolve_device(name):
    """The torch.device of --device (None: cuda if any; under torchrun cuda:LOCAL_RANK)."""
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        name = f"cuda:{os.environ.get('LOCAL_RANK', 0)}"
    device = torch.device(name)
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device.type == "cuda" and device.index >= count:
        use = "--device cpu" if count == 0 else f"cuda:0 to cuda:{count - 1}"
        fail(f"--device {name}, but torch sees {count} CUDA GPU(s); use {use}.")
    return device


def add_device_args(p):
    p.add_argument("--device", type=device_name, help="cpu, cuda or cuda:N (default: cuda if any)")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], help="default: bf16 on CUDA")


def settle_device(args):
    """Resolve args.device; args.precision, unless given: bf16 on CUDA, else fp32."""
    device = resolve_device(args.device)
    args.device = str(device)
    args.precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    return device


def add_data_args(p):
    """The data flags shared by the training and evaluation scripts."""
    p.add_argument("--data", default="synthetic", choices=data.DATASETS, help="synthetic: no "
                   f"download; footage: `{data.FOOTAGE_INSTALL}`; the others read --data-dir")
    p.add_argument("--data-dir", default=None, help="root of the ucf101 / sky / folder data")
    p.add_argument("--split", default="train", choices=data.SPLITS)
    p.add_argument("--frame-stride", type=positive_int, default=1, help="take every n-th frame")
    p.add_argument("--workers", type=non_negative_int, default=2, help="DataLoader workers")
    return p


LAPTOP_DATA = ("synthetic", "footage")  # the quick starts' data, for the tiny preset


def preset_help(stage, key, text=""):
    """A flag's help with what each preset sets it to."""
    values = "; ".join(f"{name}: {preset[stage][key]}" for name, preset in pvdm.PRESETS.items())
    return f"{text} (default: the preset's; {values})".lstrip()


def parse_for_data(parser, argv, data_defaults, stage):
    """Parse argv; a flag left out takes its --data's default, else the preset's. The preset,
    unless given: the checkpoint's on --resume, the autoencoder's in stage 2, else by --data.
    args.raised: float flags set tenfold above their defaults, which a NaN stop names."""
    chosen = parser.parse_known_args(argv)[0].data
    parser.set_defaults(**data_defaults.get(chosen, {}))
    args = parser.parse_args(argv)
    kind = stage.removeprefix("train_")
    follows = ([os.path.join(args.out, f"{kind}.pt")] if args.resume else []) + (
        [args.autoencoder] if kind == "diffusion" else [])
    recorded = next(filter(None, map(preset_on_disk, follows)), None)
    args.preset = args.preset or recorded or ("tiny" if args.data in LAPTOP_DATA else "paper")
    row = pvdm.PRESETS[args.preset][stage]
    defaults = {key: parser.get_default(key) for key in vars(args)} | row
    for key, value in row.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.raised = {key: value for key, value in vars(args).items() if isinstance(value, float)
                   and (defaults.get(key) is None or value > 10 * defaults[key])}
    return args


def preset_on_disk(path):
    """The preset a checkpoint file records (its tensors mmapped, not read), or None."""
    with contextlib.suppress(Exception), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if os.path.isfile(path):
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            return recorded_preset(ckpt)
    return None


def add_common_args(p, out, stage):
    """Flags both training stages share."""
    add_data_args(p)
    preset = partial(preset_help, stage)
    p.add_argument("--resolution", type=int_in(1, 1024), help="frame size (default: the preset's)")
    p.add_argument("--frames", type=int_in(1, 1024), help="frames per clip (default: the preset's)")
    p.add_argument("--batch-size", type=positive_int, help=preset("batch_size", "global batch"))
    p.add_argument("--steps", type=positive_int, help=preset("steps"))
    p.add_argument("--warmup", type=non_negative_int, help=preset("warmup"))
    p.add_argument("--lr-decay", choices=["cosine", "constant"], help=preset("lr_decay"))
    p.add_argument("--grad-checkpointing", action=argparse.BooleanOptionalAction, help=preset(
        "grad_checkpointing", "recompute activations in backward: less memory"))
    p.add_argument("--out", default=out, help=f"checkpoint, previews and log (default: {out}, "
                   f"or runs/DATA/{os.path.basename(out)})")
    either = p.add_mutually_exclusive_group()
    either.add_argument("--resume", action="store_true", help="continue the checkpoint in --out")
    either.add_argument("--start-over", action="store_true",
                        help="train afresh, keeping the old checkpoint and previews renamed")
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--log-every", type=positive_int, default=50)
    p.add_argument("--save-every", type=positive_int, default=500)
    add_device_args(p)


# ---- Checks and exact resumption: one line, never a lost model or a mismatched pair


def fail(message, distributed=False):
    """A user's error, as one line "error: ..."; `distributed`: every rank exits cleanly."""
    if distributed:
        dist.destroy_process_group()
    raise SystemExit(f"error: {message}")


def check_fits(args, device, world, build):
    """The paper preset's bytes per step on this rank, from build(batch) -> (model, loss) on fake
    tensors: missing memory is one line, not a kill minutes later."""
    if args.preset != "paper":
        return None
    kept = {}  # storage -> bytes, of every tensor saved for backward

    def keep(t):
        kept[t.untyped_storage()._cdata] = t.untyped_storage().nbytes()
        return t
    with (FakeTensorMode(), autocast("cpu", args.precision),
          torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t)):
        model, loss = build(args.batch_size // world)
        loss.backward()
    weights = {p.untyped_storage()._cdata for p in model.parameters()}
    need = 16 * sum(p.numel() for p in model.parameters()) + sum(
        v for k, v in kept.items() if k not in weights)
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else free_ram()
    if need > free:
        fix = ("pass --preset tiny, which trains in minutes on a CPU, or use a GPU" if
               device.type == "cpu" else
               "lower --batch-size, add --grad-checkpointing, or pass --preset tiny")
        fail(f"the paper preset needs about {need / 2**30:.0f} GB a step at "
             f"batch {args.batch_size // world}; this {device.type} has "
             f"{free / 2**30:.0f} GB free: {fix}.")
    return need


def free_ram():
    """Memory the kernel can still give (Linux: MemAvailable), else the machine's."""
    with contextlib.suppress(OSError, StopIteration):
        with open("/proc/meminfo") as f:
            line = next(line for line in f if line.startswith("MemAvailable"))
            return 1024 * int(line.split()[1])
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def checkpoint_bytes(states):
    """Bytes of a checkpoint of these modules and AdamW optimisers (two moments a weight)."""
    tensors = [t for s in states if isinstance(s, torch.nn.Module) for t in s.state_dict().values()]
    tensors += [p for s in states if isinstance(s, torch.optim.Optimizer)
                for group in s.param_groups for p in group["params"] * 2]
    return sum(t.numel() * t.element_size() for t in tensors)


def frozen_autoencoder(run, path):
    """Stage 2's frozen autoencoder (on --resume, the checkpoint's); says if --preset differs."""
    ckpt = load_checkpoint(path, "autoencoder")
    model = autoencoder_from_checkpoint(ckpt, run.device, path).requires_grad_(False)
    if run.ckpt:  # trained on the latents of this autoencoder only
        check_same_autoencoder(run.path, run.ckpt["autoencoder"], model, path)
    preset = recorded_preset(ckpt)
    if preset not in (None, run.args.preset):
        run.log(f"note: --preset {run.args.preset} sizes the UNet and its recipe, but {path} was "
                f"trained with preset {preset}")
    return model


def check_configs(run, configs):
    """Refuse to resume a checkpoint of other configs ({key: config}): classes (the data's or
    --class-cond's), or flags."""
    differs = [change for key, cfg in configs.items()
               for change in config_changes(run.ckpt[key], cfg)]
    classes = [change for change in differs if change.startswith("classes ")]
    if classes:
        run.fail(f"{run.path} learnt other classes than this run has ({classes[0]}); resume on the "
                 "videos it learnt from, with --class-cond as then, or pass --start-over.")
    if differs:
        run.fail(f"{run.path} was trained with a different config ({'; '.join(differs)}); resume "
                 "with its flags, or pass --start-over.")


def config_changes(saved, current):
    """How a checkpoint's config differs from this one's (grad_checkpointing may)."""
    try:
        there = asdict(type(current)(**saved))
    except (TypeError, ValueError) as error:  # a field unknown here, or a wrong value
        return [f"one this code cannot read: {error}"]
    return [f"{key} {there[key]} there, {value} here" for key, value in asdict(current).items()
            if key != "grad_checkpointing" and there[key] != value]


def check_same_autoencoder(path, record, autoencoder, autoencoder_path):
    """Refuse another autoencoder than a diffusion checkpoint's: its latents would be noise."""
    if pvdm.fingerprint(autoencoder) != record["fingerprint"]:
        fail(f"{path} was trained with a different autoencoder than {autoencoder_path} "
             f"(fingerprints differ); pass the one it was trained with, then {record['path']} "
             "(--start-over keeps it beside, renamed).")


def rng_states(run):
    """Every rank's random state, so a resumed run draws the noise of an unbroken one."""
    cuda = [torch.cuda.get_rng_state(run.device)] if run.device.type == "cuda" else []
    states = [[torch.get_rng_state(), *cuda]] * run.world
    if run.world > 1:
        dist.all_gather_object(states, states[0])
    return states


def restore_rng(run):
    """Continue the random streams a checkpoint saved (if it had this rank)."""
    def restore(cpu, cuda=None):
        torch.set_rng_state(cpu)
        if cuda is not None and run.device.type == "cuda":
            torch.cuda.set_rng_state(cuda, run.device)
    states = run.ckpt.get("rng")
    if states is not None and len(states) > run.rank:
        rebuilt(run.path, lambda: restore(*states[run.rank]))


def nonfinite(tree):
    """The name of the first tensor with NaN or inf in a module or nested dict, or None."""
    items = tree.state_dict().items() if isinstance(tree, torch.nn.Module) else (
        tree.items() if isinstance(tree, dict) else
        enumerate(tree) if isinstance(tree, (list, tuple)) else ())
    for key, value in items:
        if torch.is_tensor(value) and value.is_floating_point() and not torch.isfinite(value).all():
            return str(key)
        found = None if torch.is_tensor(value) else nonfinite(value)
        if found is not None:
            return f"{key}.{found}"
    return None


def check_finite(run, losses, modules):
    """Stop every rank at a non-finite loss or weight of `modules`, saying what to change."""
    bad = next((f"the {k} became {v}" for k, v in losses.items() if not math.isfinite(v)), None)
    for module in modules:
        name = bad is None and nonfinite(module)
        bad = bad or name and f"the weights became non-finite ({name})"
    if bad:
        fail(f"{bad} at step {run.step}; stopping without saving. "
             f"{what_is_left(run.path, remedy(run.args))}")


LOWER_LR = "with a lower --lr or --precision fp32"


def remedy(args):
    """After a NaN: the flags set far above their defaults nearer them, else a lower rate."""
    raised = [f"--{key.replace('_', '-')} (here {value:g})"
              for key, value in getattr(args, "raised", {}).items()]
    return f"with {' and '.join(raised)} nearer the default" if raised else LOWER_LR


def set_aside(path):
    """The newest checkpoint --start-over set aside in place of `path` (NAME.TIME.pt), or None."""
    stem, ext = os.path.splitext(path)
    return max(glob.glob(f"{glob.escape(stem)}.[0-9]*{ext}"), key=os.path.getmtime, default=None)


def what_is_left(path, then=LOWER_LR):
    """What a stopped run leaves, and what to do next."""
    if os.path.exists(path):
        return f"The last checkpoint, {path}, is intact: resume from it {then}."
    aside = set_aside(path)
    return (f"No checkpoint of this run was written yet; the one before is kept as {aside} "
            f"(rename it to {path} to resume it): start again {then}." if aside else
            f"No checkpoint was written yet: start again {then}.")


def load_file(path, what, fix):
    """A checkpoint or cache, weights only (a hostile pickle never runs); else one line."""
    path = str(path)
    problem = ("is a folder, not a file" if os.path.isdir(path) else
               "does not exist" if not os.path.exists(path) else
               "is not a regular file (a FIFO, socket or device)" if not os.path.isfile(path) else
               "is empty" if os.path.getsize(path) == 0 else None)
    if problem is None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # some foreign files warn, then fail
                return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:  # torch would suggest weights_only=False: never
            problem = ("holds more than tensors and plain values (foreign, damaged or hostile), "
                       "so it was not unpickled")
        except Exception:  # zip and OS errors
            problem = "cannot be read (it is truncated, damaged or not a PyTorch file)"
    fail(f"{what} {path} {problem}; {fix}.")


# The types each kind of checkpoint holds (dotted: nested), and what resuming needs
CHECKPOINT_KEYS = {"autoencoder": {"config": dict, "model": dict},
                   "diffusion": {"unet_config": dict, "diffusion_config": dict, "ema": dict,
                                 "autoencoder": dict, "autoencoder.path": str,
                                 "autoencoder.fingerprint": str}}
RESUME_KEYS = {"optimizer": dict, "step": int}


def entry(tree, dotted):
    """tree["a"]["b"] for "a.b", or None where a level is missing."""
    for key in dotted.split("."):
        tree = tree.get(key) if isinstance(tree, dict) else None
    return tree


def rebuilt(path, build):
    """build() from a loaded checkpoint; a config or weights this code cannot use is one line."""
    try:
        return build()
    except (TypeError, ValueError, RuntimeError, KeyError, IndexError) as error:
        fail(f"{path} holds a config or weights this code cannot rebuild a model from "
             f"({str(error).splitlines()[0][:200]}); pass a checkpoint this version wrote.")


# ---- The output folder: one run at a time, nothing trained overwritten, no stale files


def make_out_dir(out):
    """Create --out, or say in one line why it cannot be."""
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as error:
        fail(f"cannot create --out {out} ({error.strerror}: {error.filename}); pass a folder path.")


def lock_exclusively(fd):
    """The kernel's lock on an open file, to this process's end; False if taken."""
    try:
        if os.name == "nt":
            import msvcrt
            os.lseek(fd, 1 << 20, os.SEEK_SET)  # past the text, so the pid stays readable
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        else:
            import fcntl
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # any close drops it: HELD
        return True
    except (BlockingIOError, PermissionError):  # EWOULDBLOCK on POSIX, EACCES on Windows
        return False


LOCK_TEXT = re.compile(r"(?:pvdm run )?(\d{1,10})(?:@\S+)?", re.ASCII)  # or an older lock's text
HELD = {}  # run.lock path -> this process's one locked descriptor of it


def take_lock(out):
    """Create --out, one run per folder: a kernel lock on OUT/run.lock to this process's end (a
    killed run never leaves it stuck), naming the pid; a foreign file or link is never touched."""
    make_out_dir(out)
    lock = os.path.join(os.path.realpath(out), "run.lock")  # one key per folder
    clear = f"if no run uses {out}, delete {lock}, or pass another --out"
    if lock in HELD and os.path.lexists(lock) and os.path.samestat(os.fstat(HELD[lock]),
                                                                   os.lstat(lock)):
        return  # main() run again in this process (a notebook) holds it already
    while True:
        fd = None
        try:
            if os.path.lexists(lock) and not S_ISREG(os.lstat(lock).st_mode):  # FIFO, link
                fail(f"{lock} is not a regular file; {clear}.")
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0))
            if not lock_exclusively(fd):
                found = LOCK_TEXT.fullmatch(read_text(fd))
                os.close(fd)
                fail(f"another run (pid {found[1] if found else 'unknown'}) is using {out}; wait "
                     "for it to finish, or pass another --out.")
            if os.path.samestat(os.fstat(fd), os.lstat(lock)):
                break
            os.close(fd)  # removed by its ending run: lock the new one
        except FileNotFoundError:  # removed meanwhile by an ending run: try again
            fd is None or os.close(fd)
        except OSError as error:  # no permission, or no file locks (some NFS, FUSE)
            fail(f"cannot lock {lock} ({error.strerror}); pass an --out you "
                 "can write, on a disk with file locks.")
    HELD[lock] = fd
    atexit.register(release_lock, lock)
    text = read_text(fd)
    if text and not LOCK_TEXT.fullmatch(text):
        os.close(HELD.pop(lock))
        fail(f"{lock} holds {text[:40]!r}, not a lock this project wrote; {clear}.")
    os.ftruncate(fd, 0)
    os.write(fd, f"pvdm run {os.getpid()}".encode())  # read_text left the offset at 0


def read_text(fd):
    """The start of an open file, as text; the offset is left at 0."""
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 200).decode("ascii", "replace").strip()
    os.lseek(fd, 0, os.SEEK_SET)
    return text


def release_lock(lock):
    """Remove run.lock while holding it (if still ours), then let it go."""
    fd = HELD.pop(lock, None)
    if fd is not None:
        with contextlib.suppress(OSError):  # Windows keeps an open file: the next run takes it
            if os.path.samestat(os.fstat(fd), os.lstat(lock)):
                os.remove(lock)
        os.close(fd)


def remove_stale_temporaries(out):
    """Temporary files of saves that died (the lock says no other run writes here)."""
    for name in os.listdir(out):
        if re.fullmatch(r".+\.pvdm-tmp\.(?:.+\.)?\d+", name, re.ASCII):
            with contextlib.suppress(OSError):
                os.remove(os.path.join(out, name))


def prepare_out(args, name, rank, world):
    """OUT/name, once rank 0 has locked --out, removed stale temporaries and checked that a
    fresh run overwrites no checkpoint."""
    path, message = os.path.join(args.out, name), None
    if rank == 0:
        try:
            take_lock(args.out)
            remove_stale_temporaries(args.out)
            if os.path.lexists(path) and not os.path.isfile(path):
                fail(f"{path} is a folder or special file where the checkpoint "
                     "goes; move it away, or pass another --out.")
            if not (args.resume or args.start_over) and os.path.exists(path):
                fail(f"{path} already holds a trained checkpoint; pass --resume "
                     "to continue it, --start-over to train a new one (the old one is "
                     "kept beside it, renamed), or another --out.")
        except (SystemExit, OSError) as error:  # OSError: a full disk
            message = str(error).removeprefix("error: ")
    if world > 1:
        box = [message]
        dist.broadcast_object_list(box)
        message = box[0]
    if message:
        fail(message, world > 1)
    return path


PREVIEW = re.compile(r"[a-z]+_\d{7}\.(?:png|mp4)", re.ASCII)  # recon_0000500.png, sample_...mp4


def begin_training(args, path, rank):
    """--start-over renames the old checkpoint and previews with the time; Ctrl-C ends in one
    line. Returns each step's check for a Ctrl-C in a finaliser (which swallows exits)."""
    if rank == 0 and args.start_over and os.path.exists(path):
        stem, ext = os.path.splitext(path)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        stamp = time.time_ns() if os.path.exists(f"{stem}.{stamp}{ext}") else stamp
        previews = [name for name in os.listdir(args.out) if PREVIEW.fullmatch(name)]
        for old in [path, *(os.path.join(args.out, name) for name in previews)]:
            base, suffix = os.path.splitext(old)
            os.replace(old, f"{base}.{stamp}{suffix}")
        log(rank, args.out, f"--start-over: the old checkpoint is kept as {stem}.{stamp}{ext}"
            + (f", its {len(previews)} previews renamed alike" if previews else ""))
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
    """Ctrl-C in training: what was kept, and how to go on."""
    if rank:
        raise SystemExit(1)  # rank 0 says it
    if not os.path.exists(path):
        raise SystemExit(f"interrupted. {what_is_left(path, 'with the same command')}")
    step = load_file(path, "the checkpoint", "train again")["step"]
    argv = [a for a in sys.argv if a != "--start-over"]
    argv += ["--resume"] * ("--resume" not in argv)
    raise SystemExit(f"interrupted: the last checkpoint, {path}, holds step {step}; continue it "
                     f"with: python {shlex.join(argv)}")


def run_cleanly(main):
    """main(), with Ctrl-C or an escaping OSError (a full disk) in one line."""
    try:
        main()
    except KeyboardInterrupt:
        raise SystemExit("interrupted.") from None
    except OSError as error:
        fail(f"{error}; free some space or fix the path, then run again (training: --resume).")
