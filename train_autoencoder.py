"""
Stage 1 of PVDM: train the projected autoencoder (video -> three latent planes -> video).

    python train_autoencoder.py                      # tiny preset, synthetic data, CPU, minutes
    python train_autoencoder.py --data ucf101        # the paper preset: 256x256, 16 frames, one GPU
    torchrun --nproc_per_node 4 train_autoencoder.py --data ucf101   # the same on 4 GPUs (DDP)
"""
import argparse
import os
from dataclasses import asdict

import torch

import data
import pvdm
import runtime

STAGE = "train_autoencoder"  # this script's row of pvdm.PRESETS

# Each dataset's runs go to their own folder. The footage quick start's own defaults, over the tiny
# preset's: its frames sit in memory, so worker processes would only add start-up time at every
# epoch. Every other default is the preset's (pvdm.PRESETS).
DATA_DEFAULTS = {name: dict(out=f"runs/{name}/autoencoder") for name in data.DATASETS
                 if name != "synthetic"}
DATA_DEFAULTS["footage"].update(steps=1500, workers=0, latent_noise=0.0)
GAN_DEFAULTS = {"gan_weight": 0.1, "feature_weight": 0.1, "disc_lr": 2e-4}  # need --gan-start


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train PVDM's projected autoencoder.")
    runtime.add_common_args(p, out="runs/autoencoder", stage=STAGE)
    preset = lambda key, text="": runtime.preset_help(STAGE, key, text)  # noqa: E731
    weight = runtime.float_in(0)
    p.add_argument("--preset", choices=sorted(pvdm.PRESETS),
                   help="model size and recipe (default: tiny on synthetic data and footage, "
                        "paper otherwise)")
    p.add_argument("--patch", type=runtime.int_in(1, 64), help="side p of the patch of a token "
                   "(default: the preset's)")
    p.add_argument("--latent-channels", type=runtime.int_in(1, 256),
                   help="channels C of each latent plane (default: the preset's)")
    p.add_argument("--lr", type=runtime.learning_rate_value, help=preset("lr", "peak rate"))
    p.add_argument("--betas", type=runtime.float_in(0, 1, open_high=True), nargs=2,
                   help=preset("betas", "AdamW betas"))
    # The paper trains with L1 (+ LPIPS). On sparse moving content L1 pulls the model to the
    # "background only" solution, which L2 escapes, so L2 is the tiny preset's.
    p.add_argument("--l1-weight", type=weight, help=preset("l1_weight", "L1 pixel loss"))
    p.add_argument("--l2-weight", type=weight, help=preset("l2_weight", "L2 pixel loss"))
    p.add_argument("--gradient-weight", type=weight, help=preset(
        "gradient_weight", "L2 on the differences of neighbouring pixels, which pays for the "
        "edges and corners a pixel loss blurs"))
    p.add_argument("--latent-noise", type=weight, help=preset(
        "latent_noise", "std of Gaussian noise on the latent planes the decoder learns from: "
        "latents stage 2 samples more faithfully, at some cost in PSNR"))
    p.add_argument("--pixel-head", type=runtime.int_in(0, 256), help="features per pixel of two "
                   "3x3 convolutions after the un-patchify, so neighbouring patches meet; 0: the "
                   "paper's linear un-patchify alone (default: the preset's)")
    p.add_argument("--gan-start", type=runtime.non_negative_int, help=preset(
        "gan_start", "step at which the adversarial phase begins: a 3D and a 2D PatchGAN"))
    p.add_argument("--gan-weight", type=weight, help="weight of the hinge term (default 0.1)")
    p.add_argument("--feature-weight", type=weight,
                   help="weight of feature matching, L1 of discriminator features (default 0.1)")
    p.add_argument("--disc-lr", type=runtime.learning_rate_value,
                   help="the discriminators' constant rate, also on --resume (default 2e-4)")
    p.set_defaults(**GAN_DEFAULTS)
    p.add_argument("--eval-clips", type=runtime.positive_int, default=32,
                   help="held-out clips for PSNR at each save")
    args = runtime.parse_for_data(p, argv, DATA_DEFAULTS, STAGE)
    stray = [key for key, value in GAN_DEFAULTS.items() if getattr(args, key) != value]
    if stray and args.gan_start is None:
        p.error(f"--{stray[0].replace('_', '-')} belongs to the adversarial phase, which "
                "--gan-start switches on; add --gan-start or drop it.")
    if args.l1_weight == args.l2_weight == args.gradient_weight == 0:
        p.error("--l1-weight, --l2-weight and --gradient-weight are all 0, so nothing would be "
                "learnt; give one of them a weight.")
    return args


def model_config(args):
    cfg = dict(pvdm.AUTOENCODER_PRESETS[args.preset], l1_weight=args.l1_weight,
               l2_weight=args.l2_weight, gradient_weight=args.gradient_weight,
               latent_noise=args.latent_noise, grad_checkpointing=args.grad_checkpointing)
    flags = ("resolution", "frames", "patch", "latent_channels", "pixel_head")
    cfg.update({k: getattr(args, k) for k in flags if getattr(args, k) is not None})
    try:
        return pvdm.AutoencoderConfig(**cfg)
    except ValueError as e:
        runtime.fail(e)


def sized_step(cfg, batch):
    """The model and its loss on `batch` clips of noise, for the memory check on fake tensors."""
    model = pvdm.ProjectedAutoencoder(cfg)
    return model, model(torch.randn(batch, 3, cfg.frames, cfg.resolution, cfg.resolution))[0]


@torch.no_grad()
def held_out_psnr(model, clips, device, precision):
    """Held-out reconstruction PSNR, plus the reconstructions for the preview."""
    model.eval()
    with runtime.autocast(device, precision):
        recon = torch.cat([model.decode(model.encode(x.to(device))) for x in clips.split(8)])
    model.train()
    return pvdm.psnr(recon.float().cpu(), clips), recon.float().cpu()


def save_preview(out, step, real, recon):
    """A PNG strip (real row over reconstructed row, per clip) and an mp4 of them side by side."""
    rows = [v for pair in zip(real[:4], recon[:4]) for v in pair]
    data.save_frame_strip(os.path.join(out, f"recon_{step:07d}.png"), rows)
    video = torch.cat([real[:4], recon[:4]], dim=-1)
    data.write_video(os.path.join(out, f"recon_{step:07d}.mp4"), video)


def main(argv=None):
    args = parse_args(argv)
    cfg = model_config(args)
    run = runtime.Run(args, "autoencoder")  # process, device, locked --out, checkpoint on --resume
    device = run.device

    # data: training clips, and a fixed set of held-out clips for PSNR and previews
    data_args = dict(resolution=cfg.resolution, frames=cfg.frames, frame_stride=args.frame_stride,
                     seed=args.seed)
    try:
        train_set = data.make_dataset(args.data, args.data_dir, split=args.split, **data_args)
        held_out = data.make_dataset(args.data, args.data_dir, split="test", **data_args)
    except data.DataError as e:
        run.fail(str(e))

    # model, discriminators and optimisers; on --resume their states come back from the checkpoint
    model = pvdm.ProjectedAutoencoder(cfg).to(device)
    disc = pvdm.Discriminators().to(device) if args.gan_start is not None else None
    opt = torch.optim.AdamW(model.parameters(), args.lr, tuple(args.betas), weight_decay=0.0)
    disc_opt = disc and torch.optim.AdamW(disc.parameters(), lr=args.disc_lr, betas=(0.5, 0.9))
    if "disc" in run.ckpt and not disc:  # resuming without it would drop them
        run.fail(f"{run.path} holds a discriminator and its optimiser; resume with --gan-start "
                 f"{run.ckpt['args'].get('gan_start')} to keep them.")
    (ddp, scaler), (ddp_disc, disc_scaler) = run.load(
        {"config": cfg}, {"scaler": model, "disc_scaler": disc}, model=model, optimizer=opt,
        disc=disc, disc_optimizer=disc_opt)
    for group in disc_opt.param_groups if disc else ():
        group["lr"] = args.disc_lr  # as given now, also on --resume (as --lr is)
    run.log(f"autoencoder {args.preset}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M "
            f"parameters, latent planes {cfg.latent_size}, {cfg.latent_channels} channels; "
            f"{run.world} process(es) on {device}")

    stream = run.start(train_set, pvdm.PRESETS[args.preset][STAGE], lambda b: sized_step(cfg, b))
    # the bar to clear, said beside each held-out PSNR: the best naive code (averages on a coarser
    # grid) of no more values than the latent (rank 0 alone evaluates)
    try:  # reading the held-out clips can meet broken videos too
        eval_clips = torch.stack([held_out[i] for i in range(min(args.eval_clips, len(held_out)))])
    except data.DataError as e:
        run.fail(str(e))
    naive_psnr, grid = (pvdm.best_naive_psnr(eval_clips, cfg.latent_values) if run.rank == 0
                        else (0, ()))
    naive = (f"best naive code of <= {cfg.latent_values} values, a {'x'.join(map(str, grid))} "
             f"grid: {naive_psnr:.2f} dB")
    while run.step < args.steps:
        x = next(stream).to(device, non_blocking=True)
        run.set_learning_rate(opt)
        # reconstruction (plus, after --gan-start, fooling the discriminators)
        with runtime.autocast(device, args.precision):
            loss, x_hat = ddp(x)
            gan_on = disc is not None and run.step >= args.gan_start
            if gan_on:  # the 2D discriminator judges one frame per clip (its gradients: dropped)
                frame_ids = torch.randint(cfg.frames, (len(x),), device=device)
                with torch.no_grad():
                    real = disc(x, frame_ids)
                loss = loss + pvdm.adversarial_loss(disc(x_hat, frame_ids), real, args.gan_weight,
                                                    args.feature_weight)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()  # the scaler multiplies the loss in fp16 only
        scaler.step(opt)  # unscales the gradients, then AdamW's step (skipped if fp16 overflowed)
        scaler.update()
        losses = {}
        if gan_on:  # the discriminators' own step on real and detached reconstructed clips
            with runtime.autocast(device, args.precision):
                losses["d_loss"] = pvdm.discriminator_loss(
                    ddp_disc(torch.cat([x, x_hat.detach()]), frame_ids.repeat(2)))
            disc_opt.zero_grad(set_to_none=True)
            disc_scaler.scale(losses["d_loss"]).backward()
            disc_scaler.unscale_(disc_opt)
            torch.nn.utils.clip_grad_norm_(disc.parameters(), 1.0)  # as the official code
            disc_scaler.step(disc_opt)
            disc_scaler.update()

        if run.end_step(loss, [m for m in (model, disc) if m], **losses):  # rank 0, at --save-every
            psnr, recon = held_out_psnr(model, eval_clips, device, args.precision)
            ckpt = {"config": asdict(cfg), "model": model.state_dict(), "psnr": psnr,
                    "optimizer": opt.state_dict(), "fingerprint": pvdm.fingerprint(model),
                    "scaler": scaler.state_dict(), "disc_scaler": disc_scaler.state_dict()}
            if disc:
                ckpt.update(disc=disc.state_dict(), disc_optimizer=disc_opt.state_dict())
            run.save(ckpt)
            save_preview(args.out, run.step, eval_clips, recon)
            run.log(f"step {run.step:6d} | held-out PSNR {psnr:.2f} dB on {len(eval_clips)} clips "
                    f"({naive}) | saved {run.path}")
    run.finish()
    return model


if __name__ == "__main__":
    runtime.run_cleanly(main)
