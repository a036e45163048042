"""
Stage 2 of PVDM: train the triplane UNet on the frozen autoencoder's latents, jointly unconditional and
conditioned on the previous clip (paper section 3.3), so sample.py can make videos of any length.

    python train_diffusion.py                                    # after train_autoencoder.py; tiny, CPU
    python train_diffusion.py --data ucf101 --data-dir UCF-101 --autoencoder runs/ae_ucf/autoencoder.pt
    torchrun --nproc_per_node 4 train_diffusion.py ...           # DDP over 4 GPUs
"""
import argparse
import copy
import os
from dataclasses import asdict

import torch
import torch.distributed as dist

import data
import pvdm
import runtime


# Per-data defaults. synthetic: a noisy condition keeps long samples' speed (README, Differences). footage (its
# quick start): windows drawn afresh each epoch from the frames in memory, encoded on the fly.
DATA_DEFAULTS = {"synthetic": dict(cond_noise=0.1),
                 "footage": dict(out="runs/footage/diffusion", autoencoder="runs/footage/autoencoder/autoencoder.pt",
                                 steps=1000, workers=0)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train PVDM's triplane UNet on autoencoder latents.")
    runtime.add_common_args(p, out="runs/diffusion", steps=2500, batch_size=8)
    p.add_argument("--autoencoder", default="runs/autoencoder/autoencoder.pt", help="stage-1 checkpoint")
    p.add_argument("--preset", choices=sorted(pvdm.UNET_PRESETS), help="UNet size (default: tiny on synthetic data)")
    p.add_argument("--lr", type=runtime.learning_rate_value, default=2e-3, help="the paper uses 1e-4 at its size")
    p.add_argument("--cond-prob", type=runtime.probability, default=0.7,
                   help="share of samples conditioned on the clip before (the paper: 0.3 on UCF-101, 0.2 on Sky)")
    p.add_argument("--prediction", choices=("eps", "v"),
                   help="what the UNet predicts: the noise eps (the paper; default for the paper preset) or v "
                        "(default for the tiny preset: it learns the clips' layout in far fewer steps)")
    p.add_argument("--min-snr", type=runtime.float_in(0),
                   help="weigh each timestep's loss by min(SNR, gamma) (Min-SNR, Hang et al. 2023; default: 5 on the "
                   "tiny preset, where samples then keep their speed over 128 frames, 0 on the paper preset: its plain "
                   "MSE)")
    p.add_argument("--min-snr-plus-one", action=argparse.BooleanOptionalAction, default=False,
                   help="with v and --min-snr: weigh by min(SNR + 1, gamma) / (SNR + 1), so the noisiest steps, where "
                        "a clip's colours are decided, keep weight 1 instead of about SNR (near 0)")
    p.add_argument("--overlap", type=runtime.non_negative_int, help="frames each clip shares with the one before "
                   "(pvdm.align_condition; default: three quarters of a clip, 12 of 16); 0: the paper's disjoint clips")
    p.add_argument("--cond-noise", type=runtime.float_in(0), default=0.0,
                   help="std of Gaussian noise on the condition the UNet sees, in training and sampling (default: "
                        "0.1 on synthetic data, where long samples then keep their speed; else 0, the paper's)")
    p.add_argument("--class-cond", action="store_true",
                   help="also condition on each video's class (UCF-101's actions, --data folder's first level of "
                        "sub-folders, the synthetic shape's kind), dropped for 10%% of samples, so sample.py --class "
                        "works with or without --class-cfg")
    p.add_argument("--ema-decay", type=runtime.probability, default=0.9999)
    p.add_argument("--latent-cache", action="store_true",
                   help="encode one window per video once (OUT/latents.pt) and train from it: much faster, "
                        "but every epoch sees the same windows")
    p.add_argument("--cache-videos", type=runtime.positive_int, help="encode only the first N videos into the cache")
    p.add_argument("--preview-frames", type=runtime.positive_int, default=32,
                   help="length of the preview video at each save")
    p.add_argument("--preview-steps", type=runtime.positive_int, default=50, help="DDIM steps for the preview")
    args = runtime.parse_for_data(p, argv, DATA_DEFAULTS)
    args.preset = args.preset or ("tiny" if args.data in runtime.LAPTOP_DATA else "paper")
    args.prediction = args.prediction or ("v" if args.preset == "tiny" else "eps")
    args.min_snr = (5.0 if args.preset == "tiny" else 0.0) if args.min_snr is None else args.min_snr
    if args.min_snr_plus_one and (args.prediction != "v" or not args.min_snr):
        p.error("--min-snr-plus-one changes the Min-SNR weights of v-prediction; add --prediction v and --min-snr, or "
                "drop it.")
    if args.cache_videos is not None and not args.latent_cache:
        p.error("--cache-videos sets the size of the --latent-cache; add --latent-cache or drop it.")
    return args


def load_frozen_autoencoder(args, device):
    """The stage-1 model, frozen, and its checkpoint. Its clip size fixes the data's and the overlap's range."""
    ckpt = runtime.load_checkpoint(args.autoencoder, "autoencoder")
    autoencoder = runtime.autoencoder_from_checkpoint(ckpt, device, args.autoencoder).requires_grad_(False)
    cfg = autoencoder.cfg
    for flag, want in (("resolution", cfg.resolution), ("frames", cfg.frames)):
        if getattr(args, flag) not in (None, want):
            raise SystemExit(f"error: --{flag} {getattr(args, flag)} differs from the autoencoder's {want} "
                             f"({args.autoencoder}); drop the flag or train a matching autoencoder.")
    args.overlap = pvdm.default_overlap(cfg.frames) if args.overlap is None else args.overlap  # clips share frames
    if args.overlap >= cfg.frames:
        raise SystemExit(f"error: --overlap {args.overlap} must lie in [0, {cfg.frames - 1}], below the clip length.")
    return autoencoder, ckpt


@torch.no_grad()
def encode_pairs(autoencoder, window, has_prev, overlap, device, precision):
    """A (B, 3, 2T, H, W) window -> packed latents (B, C, N) of its first clip and of the clip after it, which
    starts `overlap` frames before the first ends (a window without a previous clip repeats its clip: target it)."""
    T = autoencoder.cfg.frames
    starts = [T - overlap if h else T for h in has_prev.tolist()]
    target = torch.stack([w[:, s: s + T] for w, s in zip(window, starts)])  # (B, 3, T, H, W)
    with runtime.autocast(device, precision):
        z_prev = pvdm.pack(autoencoder.encode(window[:, :, :T]))
        z = pvdm.pack(autoencoder.encode(target))
    return z_prev.float(), z.float()


def latent_cache(args, autoencoder, dataset, rank, world, device):
    """--latent-cache: one (previous, target) window of each of the first --cache-videos videos, encoded once into
    OUT/latents.pt by rank 0, as a dataset of (z_prev, z, has_prev). `source` records what it was encoded from, so
    a cache left by another run is refused rather than trained on silently."""
    path = os.path.join(args.out, "latents.pt")
    source = {"autoencoder": pvdm.fingerprint(autoencoder), "num_shapes": getattr(dataset, "num_shapes", None),
              "videos": min(args.cache_videos or len(dataset), len(dataset)), "overlap": args.overlap,
              **{k: getattr(args, k) for k in ("data", "data_dir", "split", "frame_stride", "seed")},
              **({"classes": list(dataset.classes)} if args.class_cond else {})}
    if rank == 0 and not os.path.exists(path):
        subset = torch.utils.data.Subset(dataset, range(source["videos"]))
        prev, nxt, flags, labels, progress = [], [], [], [], data.Progress(len(subset))
        for window, has_prev, *label in torch.utils.data.DataLoader(subset, batch_size=16, num_workers=args.workers):
            z_prev, z = encode_pairs(autoencoder, window.to(device), has_prev, args.overlap, device, args.precision)
            prev.append(z_prev.cpu()), nxt.append(z.cpu()), flags.append(has_prev), labels.extend(label)
            progress.advance(f"encoding latent cache: {progress.done + len(window)}/{len(subset)} windows", len(window))
        progress.close()
        runtime.save_checkpoint({"prev": torch.cat(prev), "next": torch.cat(nxt), "has_prev": torch.cat(flags),
                                 **({"label": torch.cat(labels)} if labels else {}), "source": source}, path)
    if world > 1:
        dist.barrier()  # the other ranks wait for rank 0's cache
    cache = runtime.load_file(path, "the latent cache", "delete it to re-encode, or pass another --out")
    if not isinstance(cache, dict) or cache.get("source") != source:
        runtime.fail(f"{path} was encoded from other data, another --cache-videos or another autoencoder; delete it to "
                     "re-encode, or pass another --out.", world > 1)
    C = autoencoder.cfg.latent_channels
    latents = (source["videos"], C, autoencoder.cfg.latent_values // C)  # (videos, C, N) packed
    shapes = {"prev": latents, "next": latents, "has_prev": latents[:1]}
    if args.class_cond:
        shapes["label"] = latents[:1]
    if not all(torch.is_tensor(cache.get(k)) and cache[k].shape == shape for k, shape in shapes.items()):
        runtime.fail(f"{path} is damaged (its latents are missing or not of shape {latents}); delete it to re-encode.",
                     world > 1)
    return torch.utils.data.TensorDataset(*(cache[k] for k in shapes))


def sized_step(ucfg, dcfg, batch):
    """The model and its loss on `batch` noise latents, half conditioned: what runtime.check_fits sizes up, on fake
    tensors."""
    diffusion = pvdm.GaussianDiffusion(pvdm.TriplaneUNet(ucfg), dcfg)
    z, z_prev = torch.randn(2, batch, ucfg.latent_channels, ucfg.num_tokens)
    return diffusion, diffusion(z, z_prev, torch.arange(batch) % 2 == 0)


def save_preview(out, step, autoencoder, diffusion, frames, steps):
    """A short video from the EMA weights, sampled clip after clip as sample.py does by default (DDIM, eta 1)."""
    gen = torch.Generator(device=diffusion.betas.device).manual_seed(0)
    clips = [clip.cpu() for clip, _ in pvdm.generate_video(autoencoder, diffusion, frames, n=2, steps=steps,
                                                          eta=1.0, generator=gen)]
    video = torch.cat(clips, dim=2)  # (2, 3, frames, H, W)
    data.save_frame_strip(os.path.join(out, f"sample_{step:07d}.png"), list(video))
    data.write_video(os.path.join(out, f"sample_{step:07d}.mp4"), video)


def main(argv=None):
    args = parse_args(argv)
    rank, world, device = runtime.init_process(args)
    # locked; a trained checkpoint is never overwritten
    ckpt_path = runtime.prepare_out(args, "diffusion.pt", rank, world)

    # the frozen autoencoder, and the UNet sized for its latent planes
    autoencoder, ae_ckpt = load_frozen_autoencoder(args, device)
    ae_record = {"path": args.autoencoder, "fingerprint": pvdm.fingerprint(autoencoder)}  # for sample.py's check

    # data: windows of two clips (previous, target) and with --class-cond their class, encoded on the fly or once into
    # a cache (synthetic: as many shapes per video as the autoencoder was trained on, unless --num-shapes says so)
    trained = runtime.trained_num_shapes(ae_ckpt) if args.data == "synthetic" else None
    try:
        dataset = data.make_dataset(args.data, args.data_dir, resolution=autoencoder.cfg.resolution,
                                    frames=autoencoder.cfg.frames, split=args.split, frame_stride=args.frame_stride,
                                    pairs=True, seed=args.seed, labels=args.class_cond,
                                    **runtime.num_shapes_option(args, trained))
    except data.DataError as e:
        runtime.fail(str(e), world > 1)
    classes = tuple(dataset.classes) if args.class_cond else ()
    try:
        ucfg = pvdm.unet_config_for(autoencoder.cfg, args.preset, grad_checkpointing=args.grad_checkpointing,
                                    classes=classes)
    except ValueError as error:  # a preset too deep for the autoencoder's latent planes
        runtime.fail(f"--preset {args.preset} does not fit the latents of {args.autoencoder}: {error}", world > 1)
    dcfg = pvdm.DiffusionConfig(cond_prob=args.cond_prob, prediction=args.prediction, overlap=args.overlap,
                                min_snr=args.min_snr, min_snr_plus_one=args.min_snr_plus_one,
                                cond_noise=args.cond_noise)
    diffusion = pvdm.GaussianDiffusion(pvdm.TriplaneUNet(ucfg), dcfg).to(device)
    unet = diffusion.model

    # EMA copy (what gets sampled) and optimiser; on resume everything comes back from the checkpoint
    ema = copy.deepcopy(diffusion).requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=0.0)
    step = 0
    if args.resume:
        ckpt = runtime.load_checkpoint(ckpt_path, "diffusion", resume=True)
        differs = (runtime.config_changes(ckpt["unet_config"], ucfg)
                   + runtime.config_changes(ckpt["diffusion_config"], dcfg))
        if differs:
            runtime.fail(f"{ckpt_path} holds a different UNet or diffusion config ({'; '.join(differs)}); resume with "
                         "its flags, or start a new --out (sample.py still reads it).", world > 1)
        # its latents only
        runtime.check_same_autoencoder(ckpt_path, ckpt["autoencoder"], autoencoder, args.autoencoder)
        runtime.load_states(ckpt_path, ckpt, model=unet, ema=ema.model, optimizer=opt)
        step = ckpt["step"]
        # the noise of a run that never stopped
        runtime.restore_rng(ckpt.get("rng"), rank, device, ckpt_path)
    ddp = runtime.wrap_ddp(diffusion, device, world)
    scaler = runtime.new_scaler(device, args, ckpt.get("scaler") if args.resume else None, ckpt_path)  # fp16 only
    n_params = sum(p.numel() for p in unet.parameters())
    runtime.log(rank, args.out, f"triplane UNet {args.preset}: {n_params / 1e6:.2f}M parameters on latents "
                f"{ucfg.latent_channels}x{ucfg.num_tokens}; {world} process(es) on {device}, {args.precision}")

    if args.latent_cache:
        dataset = latent_cache(args, autoencoder, dataset, rank, world, device)
    stream = runtime.batches(dataset, args.batch_size // world, rank, world, args.seed, step, args.workers)

    runtime.say_if_done(rank, args, ckpt_path, step)
    # the paper preset: is there memory?
    runtime.check_fits(args, device, world, lambda batch: sized_step(ucfg, dcfg, batch))
    # --start-over sets the old checkpoint aside now
    stop_if_interrupted = runtime.begin_training(args, ckpt_path, rank)
    meter = runtime.TrainingMeter(device, step, args, say=lambda text: runtime.log(rank, args.out, text))
    while step < args.steps:
        stop_if_interrupted()  # Ctrl-C ends the run in one line (see runtime.begin_training)
        if args.latent_cache:
            z_prev, z, has_prev, *label = (b.to(device) for b in next(stream))
        else:
            window, has_prev, *label = next(stream)
            z_prev, z = encode_pairs(autoencoder, window.to(device), has_prev, args.overlap, device, args.precision)
            has_prev, label = has_prev.to(device), [y.to(device) for y in label]
        lr = runtime.learning_rate(step, args)  # this step's rate: warm-up, then cosine (or constant)
        for group in opt.param_groups:
            group["lr"] = lr
        with runtime.autocast(device, args.precision):
            loss = ddp(z, z_prev, has_prev, *label)  # Algorithm 1, joint (un)conditional; the class with --class-cond
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()  # the scaler multiplies the loss in fp16 only, so small gradients survive
        scaler.step(opt)  # unscales the gradients, then AdamW's step (skipped if fp16 gradients overflowed)
        scaler.update()
        pvdm.update_ema(ema.model, unet, args.ema_decay, step)
        step += 1

        loss_value = runtime.mean_over_ranks(loss, world)
        saving = step % args.save_every == 0 or step == args.steps
        runtime.check_finite(loss_value, step, ckpt_path, [unet, ema] if saving else [])  # NaN weights are never saved
        rng = runtime.rng_states(device, world) if saving else None  # gathered from every rank
        meter.project(step)  # once, a few steps in: the time to --steps at this pace
        if step % args.log_every == 0 or step == args.steps:
            runtime.log(rank, args.out, f"step {step:6d} | loss {loss_value:.4f} | lr {lr:.2e} | {meter.line(step)}")
        if rank == 0 and saving:
            ckpt = {"kind": "diffusion", "unet_config": asdict(ucfg), "diffusion_config": asdict(dcfg),
                    "model": unet.state_dict(), "ema": ema.model.state_dict(), "optimizer": opt.state_dict(),
                    "step": step, "args": vars(args), "autoencoder": ae_record, "rng": rng,
                    "scaler": scaler.state_dict()}
            runtime.save_checkpoint(ckpt, ckpt_path)
            save_preview(args.out, step, autoencoder, ema, args.preview_frames, args.preview_steps)
            runtime.log(rank, args.out, f"step {step:6d} | saved {ckpt_path} and an EMA preview")
    runtime.teardown(world)
    return ema


if __name__ == "__main__":
    runtime.run_cleanly(main)
