"""
Stage 1 of PVDM: train the projected autoencoder (video -> three latent planes -> video).

    python train_autoencoder.py                                   # tiny preset, synthetic data, CPU, minutes
    python train_autoencoder.py --data ucf101 --data-dir UCF-101  # the paper's settings: 256x256, 16 frames
    torchrun --nproc_per_node 4 train_autoencoder.py ...          # the same script on 4 GPUs (DDP)

The shared training plumbing (distributed setup, precision, endless batches, logging) lives here too and
train_diffusion.py imports it, so each training script stays one linear story.
"""
import argparse
import contextlib
import math
import os
import time
from dataclasses import asdict

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader

import data
import pvdm

# ----------------------------------------------------------------------------------------------
# Plumbing shared by both training scripts
# ----------------------------------------------------------------------------------------------


def add_common_args(p, out, steps, batch_size):
    """Flags both stages share. --batch-size is the global batch, split evenly over the ranks."""
    data.add_data_args(p)
    p.add_argument("--resolution", type=int, help="frame size (default: the preset's)")
    p.add_argument("--frames", type=int, help="frames per clip (default: the preset's)")
    p.add_argument("--batch-size", type=int, default=batch_size)
    p.add_argument("--steps", type=int, default=steps, help="optimiser steps in total")
    p.add_argument("--warmup", type=int, default=100, help="steps of linear learning-rate warm-up")
    p.add_argument("--lr-decay", choices=["cosine", "constant"], default="cosine",
                   help="after warm-up: cosine decay to zero at --steps, or a constant rate (the paper's)")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute activations in backward")
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


def say_if_done(rank, args, ckpt_path, step):
    """A resumed run already at --steps trains nothing: one line says so, rather than a silent exit."""
    if step >= args.steps:
        log(rank, args.out, f"{ckpt_path} is already at step {step} of --steps {args.steps}; pass a larger --steps "
            "to train on.")


def fail(message, distributed=False):
    """A user error found at start-up: one line, and a clean exit on every rank."""
    if distributed:
        dist.destroy_process_group()
    raise SystemExit(f"error: {message}")


def autocast(device, precision):
    """One mixed-precision context for the forward pass; a no-op in fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


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
    the weights: the tiny autoencoder gained 1.6 dB over a constant rate in 3,000 steps (README)."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    if args.lr_decay == "constant":
        return args.lr
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * 0.5 * (1 + math.cos(math.pi * progress))


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


# ----------------------------------------------------------------------------------------------
# Stage 1
# ----------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train PVDM's projected autoencoder.")
    add_common_args(p, out="runs/autoencoder", steps=1750, batch_size=4)
    p.add_argument("--preset", choices=sorted(pvdm.AUTOENCODER_PRESETS),
                   help="model size (default: tiny on synthetic data, paper otherwise)")
    p.add_argument("--latent-channels", type=int, help="channels C of each latent plane (default: the preset's)")
    p.add_argument("--lr", type=float, default=3e-3, help="the paper uses 1e-4 at its size")
    p.add_argument("--betas", type=float, nargs=2, default=(0.9, 0.99), help="AdamW betas; paper (0.5, 0.9)")
    # The paper trains with L1 (+ LPIPS). On sparse moving content L1 pulls the model to the "background
    # only" solution, which L2 escapes, so L2 is the default here; --l1-weight 1 --l2-weight 0 follows the paper.
    p.add_argument("--l1-weight", type=float, default=0.0, help="weight of the L1 pixel loss")
    p.add_argument("--l2-weight", type=float, default=1.0, help="weight of the L2 (MSE) pixel loss")
    p.add_argument("--gan-start", type=int, help="step at which the 3D discriminator switches on (default: never)")
    p.add_argument("--gan-weight", type=float, default=0.1, help="weight of the adversarial loss")
    p.add_argument("--eval-clips", type=int, default=32, help="held-out clips for PSNR at each save")
    args = p.parse_args(argv)
    args.preset = args.preset or ("tiny" if args.data == "synthetic" else "paper")
    return args


def model_config(args):
    cfg = dict(pvdm.AUTOENCODER_PRESETS[args.preset], l1_weight=args.l1_weight, l2_weight=args.l2_weight,
               grad_checkpointing=args.grad_checkpointing)
    flags = (("resolution", args.resolution), ("frames", args.frames), ("latent_channels", args.latent_channels))
    cfg.update({k: v for k, v in flags if v is not None})
    try:
        return pvdm.AutoencoderConfig(**cfg)
    except ValueError as e:
        raise SystemExit(f"error: {e}")


@torch.no_grad()
def held_out_psnr(model, clips, device, precision):
    """Held-out reconstruction PSNR, plus the reconstructions for the preview."""
    model.eval()
    with autocast(device, precision):
        recon = torch.cat([model.decode(model.encode(x.to(device))) for x in clips.split(8)])
    model.train()
    return pvdm.psnr(recon.float().cpu(), clips), recon.float().cpu()


def save_preview(out, step, real, recon):
    """A PNG strip (real row over reconstructed row, per clip) and an mp4 of the same, side by side."""
    from sample import save_frame_strip, write_video  # sample.py owns the video writers

    rows = [v for pair in zip(real[:4], recon[:4]) for v in pair]
    save_frame_strip(os.path.join(out, f"recon_{step:07d}.png"), rows)
    write_video(os.path.join(out, f"recon_{step:07d}.mp4"), torch.cat([real[:4], recon[:4]], dim=-1))


def main(argv=None):
    args = parse_args(argv)
    cfg = model_config(args)
    rank, world, device = setup(args)
    os.makedirs(args.out, exist_ok=True)
    ckpt_path = os.path.join(args.out, "autoencoder.pt")

    # model, discriminator and optimisers; on resume everything comes back from the checkpoint
    model = pvdm.ProjectedAutoencoder(cfg).to(device)
    disc = pvdm.Discriminator3D().to(device) if args.gan_start is not None else None
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=tuple(args.betas), weight_decay=0.0)
    disc_opt = torch.optim.AdamW(disc.parameters(), lr=args.lr, betas=tuple(args.betas)) if disc else None
    step = 0
    if args.resume:
        ckpt = pvdm.load_checkpoint(ckpt_path, "autoencoder")
        if ckpt["config"] != asdict(cfg):
            fail(f"{ckpt_path} was trained with a different model config; resume with the same flags.", world > 1)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        if disc and "disc" in ckpt:
            disc.load_state_dict(ckpt["disc"])
            disc_opt.load_state_dict(ckpt["disc_optimizer"])
        step = ckpt["step"]
    ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else model
    ddp_disc = (DDP(disc, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else disc) if disc else None
    scaler = torch.amp.GradScaler(enabled=args.precision == "fp16")
    n_params = sum(p.numel() for p in model.parameters())
    log(rank, args.out, f"autoencoder {args.preset}: {n_params / 1e6:.2f}M parameters, latent planes "
        f"{cfg.latent_size}, {cfg.latent_channels} channels; {world} process(es) on {device}, {args.precision}")

    # data: training clips, and a fixed set of held-out clips for PSNR and previews
    data_args = dict(resolution=cfg.resolution, frames=cfg.frames, frame_stride=args.frame_stride, seed=args.seed,
                     **data.synthetic_options(args))
    try:
        train_set = data.make_dataset(args.data, args.data_dir, split=args.split, **data_args)
        held_out = data.make_dataset(args.data, args.data_dir, split="test", **data_args)
    except data.DataError as e:
        fail(str(e), world > 1)
    num_shapes = getattr(train_set, "num_shapes", None)  # synthetic data: recorded for stage 2 and for resuming
    trained = data.trained_num_shapes(ckpt) if args.resume else None
    if None not in (trained, num_shapes) and trained != num_shapes:
        fail(f"{ckpt_path} was trained on {trained} shape(s) per video, not {num_shapes}; resume with "
             f"--num-shapes {trained}.", world > 1)
    say_if_done(rank, args, ckpt_path, step)
    eval_clips = torch.stack([held_out[i] for i in range(min(args.eval_clips, len(held_out)))])
    stream = batches(train_set, args.batch_size // world, rank, world, args.seed, step, args.workers)

    meter = Meter(device, step, args.batch_size)
    while step < args.steps:
        x = next(stream).to(device, non_blocking=True)
        # reconstruction (plus, after --gan-start, fooling the discriminator)
        with autocast(device, args.precision):
            loss, x_hat = ddp(x)
            gan_on = disc is not None and step >= args.gan_start
            if gan_on:
                loss = loss + args.gan_weight * pvdm.hinge_g_loss(ddp_disc(x_hat))
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        lr = learning_rate(step, args)
        for group in opt.param_groups:
            group["lr"] = lr
        scaler.step(opt)
        scaler.update()
        if gan_on:  # the discriminator's own step, on detached reconstructions
            with autocast(device, args.precision):
                d_loss = pvdm.hinge_d_loss(ddp_disc(x), ddp_disc(x_hat.detach()))
            disc_opt.zero_grad(set_to_none=True)
            d_loss.backward()
            disc_opt.step()
        step += 1

        loss_value = mean_over_ranks(loss, world)
        check_finite(loss_value, step)
        if step % args.log_every == 0 or step == args.steps:
            gan = f" | d_loss {mean_over_ranks(d_loss, world):.4f}" if gan_on else ""
            log(rank, args.out, f"step {step:6d} | loss {loss_value:.4f}{gan} | lr {lr:.2e} | {meter.line(step)}")
        if rank == 0 and (step % args.save_every == 0 or step == args.steps):
            psnr, recon = held_out_psnr(model, eval_clips, device, args.precision)
            save_preview(args.out, step, eval_clips, recon)
            ckpt = {"kind": "autoencoder", "config": asdict(cfg), "model": model.state_dict(),
                    "optimizer": opt.state_dict(), "step": step, "args": vars(args),
                    "fingerprint": pvdm.fingerprint(model), "psnr": psnr, "num_shapes": num_shapes}
            if disc:
                ckpt.update(disc=disc.state_dict(), disc_optimizer=disc_opt.state_dict())
            pvdm.save_checkpoint(ckpt, ckpt_path)
            log(rank, args.out, f"step {step:6d} | held-out PSNR {psnr:.2f} dB on {len(eval_clips)} clips | saved {ckpt_path}")
    if world > 1:
        dist.destroy_process_group()
    return model


if __name__ == "__main__":
    main()
