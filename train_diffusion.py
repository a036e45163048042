"""
Stage 2 of PVDM: train the triplane UNet on the frozen autoencoder's latents, jointly unconditional
and conditioned on the previous clip (paper section 3.3), so sample.py makes videos of any length.

    python train_diffusion.py                        # after train_autoencoder.py; tiny, CPU
    python train_diffusion.py --data ucf101          # on runs/ucf101/autoencoder/autoencoder.pt
    torchrun --nproc_per_node 4 train_diffusion.py --data ucf101     # DDP over 4 GPUs
"""
import argparse
import copy
import os
from dataclasses import asdict

import torch

import data
import pvdm
import runtime

STAGE = "train_diffusion"  # this script's row of pvdm.PRESETS

# Each dataset's runs go to their own folder, beside its autoencoder's. The footage quick start's
# own defaults, over the tiny preset's: windows drawn afresh each epoch from the frames in memory,
# encoded on the fly. Every other default is the preset's: its autoencoder's, unless --preset says.
DATA_DEFAULTS = {name: dict(out=f"runs/{name}/diffusion",
                            autoencoder=f"runs/{name}/autoencoder/autoencoder.pt")
                 for name in data.DATASETS if name != "synthetic"}
DATA_DEFAULTS["footage"].update(steps=1000, workers=0, cond_noise=0.0)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train PVDM's triplane UNet on autoencoder latents.")
    runtime.add_common_args(p, out="runs/diffusion", stage=STAGE)
    preset = lambda key, text="": runtime.preset_help(STAGE, key, text)  # noqa: E731
    p.add_argument("--autoencoder", default="runs/autoencoder/autoencoder.pt",
                   help="stage-1 checkpoint (default: runs/autoencoder/autoencoder.pt on synthetic "
                        "data, else runs/DATA/autoencoder/autoencoder.pt)")
    p.add_argument("--preset", choices=sorted(pvdm.PRESETS), help="UNet size and recipe (default: "
                   "the autoencoder's; if it records none, tiny on synthetic data and footage, "
                   "paper otherwise)")
    p.add_argument("--lr", type=runtime.learning_rate_value, help=preset("lr", "peak rate"))
    p.add_argument("--cond-prob", type=runtime.probability, help=preset(
        "cond_prob", "share of samples conditioned on the clip before (the paper: 0.3 on UCF-101, "
        "0.2 on Sky)"))
    p.add_argument("--prediction", choices=("eps", "v"), help=preset(
        "prediction", "what the UNet predicts: the noise eps (the paper) or v (on the tiny preset "
        "it learns the clips' layout in far fewer steps)"))
    p.add_argument("--min-snr", type=runtime.float_in(0), help=preset(
        "min_snr", "weigh each timestep's loss by min(SNR, gamma) (Min-SNR, Hang et al. 2023; "
        "on the tiny preset samples then keep their speed over 128 frames); 0: plain MSE"))
    p.add_argument("--overlap", type=runtime.non_negative_int, help=preset(
        "overlap_share", "frames each clip shares with the one before (pvdm.align_condition; "
        "default: this share of a clip, 12 of 16 on the tiny preset); 0: the paper's disjoint "
        "clips"))
    p.add_argument("--cond-noise", type=runtime.float_in(0), help=preset(
        "cond_noise", "std of Gaussian noise on the condition the UNet sees, in training and "
        "sampling (long tiny samples then keep their speed)"))
    p.add_argument("--class-cond", action=argparse.BooleanOptionalAction, help=preset(
        "class_cond", "also condition on each video's class (UCF-101's actions, --data folder's "
        "sub-folders, the synthetic shape's kind), dropped for 10%% of samples, so sample.py "
        "--class works with or without --class-cfg"))
    p.add_argument("--ema-decay", type=runtime.probability, default=0.9999)
    p.add_argument("--latent-cache", action="store_true", help="encode one window per video once "
                   "(OUT/latents.pt) and train from it: much faster, but every epoch sees the "
                   "same windows")
    p.add_argument("--cache-videos", type=runtime.positive_int,
                   help="encode only the first N videos into the cache")
    p.add_argument("--preview-frames", type=runtime.positive_int, default=32,
                   help="length of the preview video at each save")
    p.add_argument("--preview-steps", type=runtime.positive_int, default=50,
                   help="DDIM steps for the preview")
    p.add_argument("--export", metavar="DIR", help="train nothing: write the model in --out, "
                   "weights only in half precision, to DIR/autoencoder.pt and DIR/diffusion.pt "
                   "(how pretrained/ was made)")
    args = runtime.parse_for_data(p, argv, DATA_DEFAULTS, STAGE)
    if args.cache_videos is not None and not args.latent_cache:
        p.error("--cache-videos sets the size of the --latent-cache; add --latent-cache or drop "
                "it.")
    return args


def check_clips(args, cfg, run):
    """The autoencoder's clip size fixes the data's and the overlap's range."""
    for flag, want in (("resolution", cfg.resolution), ("frames", cfg.frames)):
        if getattr(args, flag) not in (None, want):
            run.fail(f"--{flag} {getattr(args, flag)} differs from the autoencoder's {want} "
                     f"({args.autoencoder}); drop the flag or train a matching autoencoder.")
    args.overlap = int(cfg.frames * args.overlap_share) if args.overlap is None else args.overlap
    if args.overlap >= cfg.frames:
        run.fail(f"--overlap {args.overlap} must lie in [0, {cfg.frames - 1}], below the clip "
                 "length.")


def sized_step(ucfg, dcfg, batch):
    """The model and its loss on `batch` noise latents, half conditioned, for the memory check."""
    diffusion = pvdm.GaussianDiffusion(pvdm.TriplaneUNet(ucfg), dcfg)
    z, z_prev = torch.randn(2, batch, ucfg.latent_channels, ucfg.num_tokens)
    return diffusion, diffusion(z, z_prev, torch.arange(batch) % 2 == 0)


def save_preview(out, step, autoencoder, diffusion, frames, steps):
    """A short video from the EMA weights, sampled clip by clip as sample.py does (DDIM, eta 1)."""
    gen = torch.Generator(device=diffusion.betas.device).manual_seed(0)
    clips = [clip.cpu() for clip, _ in pvdm.generate_video(autoencoder, diffusion, frames, n=2,
                                                          steps=steps, eta=1.0, generator=gen)]
    video = torch.cat(clips, dim=2)  # (2, 3, frames, H, W)
    data.save_frame_strip(os.path.join(out, f"sample_{step:07d}.png"), list(video))
    data.write_video(os.path.join(out, f"sample_{step:07d}.mp4"), video)


def main(argv=None):
    args = parse_args(argv)
    if args.export:
        return runtime.export_model(os.path.join(args.out, "diffusion.pt"), args.export)
    run = runtime.Run(args, "diffusion")  # process, device, --out, frozen autoencoder, checkpoint
    device, autoencoder = run.device, run.autoencoder
    check_clips(args, autoencoder.cfg, run)

    # the data: windows of two clips (previous, target) and, with --class-cond, their class
    try:
        dataset = data.make_dataset(args.data, args.data_dir, resolution=autoencoder.cfg.resolution,
                                    frames=autoencoder.cfg.frames, split=args.split, pairs=True,
                                    frame_stride=args.frame_stride, seed=args.seed,
                                    labels=args.class_cond)
    except data.DataError as e:
        run.fail(str(e))

    # the UNet sized for the autoencoder's latent planes, its EMA copy (what gets sampled) and the
    # optimiser; on --resume their states come back from the checkpoint
    try:
        ucfg = pvdm.unet_config_for(autoencoder.cfg, args.preset,
                                    grad_checkpointing=args.grad_checkpointing,
                                    classes=tuple(dataset.classes) if args.class_cond else ())
    except ValueError as error:  # a preset too deep for the autoencoder's latent planes
        run.fail(f"--preset {args.preset} does not fit the latents of {args.autoencoder}: {error}")
    dcfg = pvdm.DiffusionConfig(cond_prob=args.cond_prob, prediction=args.prediction,
                                overlap=args.overlap, min_snr=args.min_snr,
                                cond_noise=args.cond_noise)
    diffusion = pvdm.GaussianDiffusion(pvdm.TriplaneUNet(ucfg), dcfg).to(device)
    unet, ema = diffusion.model, copy.deepcopy(diffusion).requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=0.0)
    [(ddp, scaler)] = run.load({"unet_config": ucfg, "diffusion_config": dcfg},
                               {"scaler": diffusion}, model=unet, ema=ema.model, optimizer=opt)
    ae_record = {"path": args.autoencoder, "fingerprint": pvdm.fingerprint(autoencoder)}
    run.log(f"triplane UNet {args.preset}: {sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M "
            f"parameters on latents {ucfg.latent_channels}x{ucfg.num_tokens}; {run.world} "
            f"process(es) on {device}")
    if args.latent_cache:  # encoded once, rather than at every step
        dataset = data.latent_cache(args, autoencoder, dataset, run)

    recipe = [key.replace("overlap_share", "overlap") for key in pvdm.PRESETS[args.preset][STAGE]]
    stream = run.start(dataset, recipe, lambda batch: sized_step(ucfg, dcfg, batch))
    while run.step < args.steps:
        if args.latent_cache:
            z_prev, z, has_prev, *label = (b.to(device) for b in next(stream))
        else:
            window, has_prev, *label = next(stream)
            z_prev, z = data.encode_pairs(autoencoder, window.to(device), has_prev, args.overlap,
                                          device, args.precision)
            has_prev, label = has_prev.to(device), [y.to(device) for y in label]
        run.set_learning_rate(opt)
        with runtime.autocast(device, args.precision):
            loss = ddp(z, z_prev, has_prev, *label)  # Algorithm 1, joint (un)conditional; the class
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()  # the scaler multiplies the loss in fp16 only
        scaler.step(opt)  # unscales the gradients, then AdamW's step (skipped if fp16 overflowed)
        scaler.update()
        pvdm.update_ema(ema.model, unet, args.ema_decay, run.step)

        if run.end_step(loss, [unet, ema]):  # rank 0, every --save-every steps
            run.save({"unet_config": asdict(ucfg), "diffusion_config": asdict(dcfg),
                      "model": unet.state_dict(), "ema": ema.model.state_dict(),
                      "optimizer": opt.state_dict(), "scaler": scaler.state_dict(),
                      "autoencoder": ae_record})  # sample.py checks the pair by it
            save_preview(args.out, run.step, autoencoder, ema, args.preview_frames,
                         args.preview_steps)
            run.log(f"step {run.step:6d} | saved {run.path} and an EMA preview")
    run.finish()
    return ema


if __name__ == "__main__":
    runtime.run_cleanly(main)
