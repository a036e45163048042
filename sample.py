"""
Sample videos of any length from a trained PVDM: clip 1 unconditionally, then each clip conditioned on
the latent of the clip before it (paper section 3.3), decoded and appended to the file as it comes.

    python sample.py --frames 128                        # after the quick start: samples/video_0000.mp4, ...
    python sample.py --frames 128 --save-latents         # also the three latent planes of every clip, as images
    python sample.py --num-videos 2048 --steps 400 --eta 1 --out samples/ucf   # the paper's sampler, for FVD
"""
import argparse
import contextlib
import gc
import json
import os
import sys
import time
from stat import S_ISREG

import imageio.v3 as iio
import numpy as np
import torch

import data
import pvdm
from runtime import (autocast, device_name, finite_float, float_in, int_in, load_diffusion, make_out_dir,
                     non_negative_int, positive_int, resolve_device, run_cleanly, take_lock)


QUICK_START = "runs/diffusion/diffusion.pt"
SHIPPED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pretrained", "diffusion.pt")


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


@contextlib.contextmanager
def removed_on_failure(paths):
    """Files being written, removed if the block fails (a full disk, Ctrl-C): half a video never passes for one."""
    try:
        yield
    except BaseException:
        for path in paths:
            with contextlib.suppress(OSError):
                os.remove(path)
        raise


def check_out_dir(out, names, formats, overwrite):
    """Refuse a folder holding other videos (evaluate.py would mix them in) or, unless --overwrite, earlier videos of
    the names this run writes."""
    ours = {f"{name}.{fmt}" for name in names for fmt in formats}
    videos = sorted(f for f in os.listdir(out) if f.endswith((".mp4", ".gif")))
    stale, same = [f for f in videos if f not in ours], [f for f in videos if f in ours]
    special = [f for f in same if not S_ISREG(os.lstat(os.path.join(out, f)).st_mode)]
    if special:  # writing into a FIFO would hang; a link or folder would be followed or fail half-way
        raise SystemExit(f"error: {os.path.join(out, special[0])} is not a regular file; remove it or pick another "
                         "--out.")
    if stale:
        raise SystemExit(f"error: {out} already holds {len(stale)} other video(s) such as {stale[0]}; "
                         "pick an empty --out or remove them.")
    if same and not overwrite:
        raise SystemExit(f"error: {out} already holds {len(same)} video(s) of the names this run writes, such as "
                         f"{same[0]}; pass --overwrite to replace them, or another --out.")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Sample long videos from a trained PVDM, clip by clip.")
    p.add_argument("--diffusion", default=QUICK_START if os.path.exists(QUICK_START) else SHIPPED,
                   help=f"stage-2 checkpoint (default: the quick start's {QUICK_START} if it exists, else the model "
                        f"shipped in {os.path.relpath(SHIPPED)})")
    p.add_argument("--autoencoder", help="stage-1 checkpoint (default: the one recorded in --diffusion)")
    p.add_argument("--frames", type=positive_int, help="frames per video, any number (default: one clip)")
    p.add_argument("--num-videos", type=positive_int, default=4)
    p.add_argument("--batch-size", type=positive_int, default=8, help="videos sampled together")
    p.add_argument("--sampler", choices=["ddim", "ddpm"], default="ddim",
                   help="ddim: --steps steps with noise --eta; ddpm: all T steps with eta 1 (slow)")
    p.add_argument("--steps", type=positive_int, help="DDIM steps (default 50; the paper: 400)")
    p.add_argument("--eta", type=float_in(0), help="DDIM noise: 0 deterministic, 1 DDPM-like (default 1, the paper's)")
    p.add_argument("--cfg", type=finite_float, default=0.0,
                   help="classifier-free guidance weight w on the previous clip (clips 2 onward)")
    p.add_argument("--class", dest="classes", nargs="+", metavar="NAME",
                   help="for a model trained with --class-cond: the class of the videos, by name or index, one for all "
                        "or one per video (default: none, the null class)")
    p.add_argument("--class-cfg", type=finite_float, default=0.0,
                   help="classifier-free guidance weight w on the class (every clip of a video keeps its class)")
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--out", default="samples", help="folder for the videos, contact sheets and samples.json")
    p.add_argument("--overwrite", action="store_true", help="replace videos of the same names left in --out")
    p.add_argument("--format", nargs="+", choices=["mp4", "gif"], default=["mp4"], help="one or both")
    p.add_argument("--fps", type=int_in(1, 240), default=8)
    p.add_argument("--device", type=device_name, help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--no-ema", action="store_true", help="sample the raw weights instead of their EMA")
    p.add_argument("--save-latents", action="store_true",
                   help="also write each clip's three latent planes as PNGs, and overview.png (the README's picture)")
    args = p.parse_args(argv)
    if args.sampler == "ddpm" and (args.steps is not None or args.eta is not None):
        p.error("--sampler ddpm always runs all T steps with eta 1; drop --steps/--eta or use --sampler ddim.")
    if args.class_cfg and not args.classes:
        p.error("--class-cfg guides towards the class of --class; add --class NAME or drop it.")
    if args.classes and len(args.classes) not in (1, args.num_videos):
        p.error(f"--class takes one class for all videos or one per video ({args.num_videos}); got "
                f"{len(args.classes)}.")
    args.device = str(resolve_device(args.device))
    args.precision = args.precision or ("bf16" if args.device.startswith("cuda") else "fp32")
    return args


def video_labels(asked, known, path, num_videos):
    """The class index of each video from --class (names or indices), or None without it; a class the model does not
    know is one line naming those it does."""
    if not asked:
        return None
    if not known:
        raise SystemExit(f"error: {path} was trained without classes, so --class has nothing to choose; drop it, or "
                         "train with train_diffusion.py --class-cond.")
    lower = [name.lower() for name in known]
    labels = []
    for name in asked:
        if name.isdigit() and int(name) < len(known):
            labels.append(int(name))
        elif name.lower() in lower:
            labels.append(lower.index(name.lower()))
        else:
            shown = ", ".join(known[:12]) + (f", ... ({len(known)} in all)" if len(known) > 12 else "")
            raise SystemExit(f"error: {path} knows no class {name!r}; it knows {shown} (or indices 0-"
                             f"{len(known) - 1}).")
    return labels * num_videos if len(labels) == 1 else labels


def sampler_settings(args, timesteps):
    """(steps, eta) for diffusion.sample: DDPM is the DDIM update with every step and eta = 1."""
    if args.sampler == "ddpm":
        return timesteps, 1.0
    steps = args.steps or 50
    if steps > timesteps:
        raise SystemExit(f"error: --steps {steps} exceeds the model's {timesteps} diffusion steps; use at most that.")
    return steps, 1.0 if args.eta is None else args.eta


def batch_generator(seed, index, device):
    """Each batch gets its own generator, seeded from (seed, batch index): the same flags give the same
    videos, and no two (seed, batch) pairs share noise, as seed + index would."""
    state = np.random.SeedSequence([seed, index]).generate_state(2, dtype=np.uint32)
    return torch.Generator(device).manual_seed(int(state[0]) << 32 | int(state[1]))


def sampler_progress(progress, videos, n_clips):
    """The sampler's callback after step i of `steps`: where this batch of videos is, on the status line."""
    start = progress.done
    return lambda i, steps: progress.advance(
        f"{videos} | clip {(progress.done - start) // steps + 1}/{n_clips} | step {i}/{steps}")


def sample_batch(args, autoencoder, diffusion, names, generator, progress, continuity, **sample_kwargs):
    """Generate one batch of videos clip by clip, appending each clip's new frames to its files at once."""
    every, made = max(1, autoencoder.cfg.frames // 4), 0  # contact sheets: every 4th frame of a 16-frame clip
    sheets = [[] for _ in names]  # memory grows by a quarter of the frames, not by the whole video
    paths = [[os.path.join(args.out, f"{name}.{fmt}") for fmt in args.format] for name in names]
    # closes every file, and removes them all if sampling fails half-way (a full disk, Ctrl-C): no part-video is left
    with removed_on_failure(sum(paths, [])), contextlib.ExitStack() as files:
        writers = [[files.enter_context(contextlib.closing(data.VideoWriter(path, args.fps))) for path in video]
                   for video in paths]  # writers[i]: the files of video i
        clips = pvdm.generate_video(autoencoder, diffusion, args.frames, n=len(names), generator=generator,
                                    progress=progress, **sample_kwargs)
        for k, (video, z) in enumerate(clips):  # video (n, 3, <=T, H, W): the new frames; z (n, C, N)
            if not torch.isfinite(z).all():  # never a black video written as if it were a sample
                raise SystemExit(f"error: sampling gave NaN or inf latents in clip {k + 1}; lower --cfg, or sample "
                                 "an earlier checkpoint.")
            planes = pvdm.unpack(z, *autoencoder.cfg.latent_size)
            shown = [j for j in range(video.shape[2]) if (made + j) % every == 0]  # frame numbers in the video
            for i, name in enumerate(names):
                frames = data.to_uint8(video[i])  # (<=T, H, W, 3)
                for writer in writers[i]:
                    writer.append(frames)
                continuity.add(name, frames)
                sheets[i].append(video[i, :, shown].float().cpu())  # (3, <=4, H, W)
                if args.save_latents:
                    data.save_latent_images(os.path.join(args.out, "latents", f"{name}_clip{k:02d}"),
                                            [p[i] for p in planes])
            made += video.shape[2]
    continuity.forget(names)
    for name, shown in zip(names, sheets):  # one row per clip length of the video, whatever the clips' overlap
        data.save_frame_strip(os.path.join(args.out, f"{name}.png"), torch.cat(shown, dim=1).split(4, dim=1))


def save_overview(out, names):
    """The README's picture: the first videos' contact sheets beside the three latent planes of the first clip."""
    def stack(images, axis):  # side by side (axis 1) or one above another (axis 0), white between, 8 pixels
        across = max(image.shape[1 - axis] for image in images)
        pads = [[(0, 8) if a == axis else (0, across - image.shape[a]) if a < 2 else (0, 0) for a in range(3)]
                for image in images]
        return np.concatenate([np.pad(im, pad, constant_values=255) for im, pad in zip(images, pads)], axis=axis)
    read = lambda path: iio.imread(os.path.join(out, path))[..., :3]  # noqa: E731
    planes = [read(os.path.join("latents", f"{names[0]}_clip00_{p}.png")) for p in ("zs", "zh", "zw")]
    iio.imwrite(os.path.join(out, "overview.png"), stack([read(f"{n}.png") for n in names[:4]] + [stack(planes, 0)], 1))


def main(argv=None):
    args = parse_args(argv)
    shipped = os.path.abspath(args.diffusion) == SHIPPED
    print(f"model: {args.diffusion}{' (shipped with the code: pretrained/)' if shipped else ''}", file=sys.stderr)
    device = torch.device(args.device)
    autoencoder, diffusion, train_step, args.autoencoder = load_diffusion(args.diffusion, device, args.autoencoder,
                                                                          ema=not args.no_ema)
    gc.freeze()  # imageio runs a full garbage collection as it closes each file: leave the loaded models out of it
    steps, eta = sampler_settings(args, diffusion.cfg.timesteps)
    classes = diffusion.model.cfg.classes
    labels = video_labels(args.classes, classes, args.diffusion, args.num_videos)  # one per video, or None
    clip_len = autoencoder.cfg.frames
    args.frames = args.frames or clip_len
    n_clips = pvdm.clips_needed(args.frames, clip_len, diffusion.cfg.overlap)
    names = [f"video_{i:04d}" for i in range(args.num_videos)]
    make_out_dir(os.path.join(args.out, "latents") if args.save_latents else args.out)
    take_lock(args.out)  # one run per --out
    check_out_dir(args.out, names, args.format, args.overwrite)
    print(f"sampling {args.num_videos} video(s) of {args.frames} frames ({n_clips} clip(s) of {clip_len} sharing "
          f"{diffusion.cfg.overlap} frames) with "
          f"{args.sampler} {steps} steps, eta {eta}, cfg {args.cfg}, "
          f"{f'classes {sorted({classes[y] for y in labels})} with class cfg {args.class_cfg}, ' if labels else ''}"
          f"{'raw' if args.no_ema else 'EMA'} weights "
          f"of step {train_step}, on {device} in {args.precision}", file=sys.stderr)

    # batch by batch; each batch has its own seeded generator so the result does not depend on timing
    batches = [names[i:i + args.batch_size] for i in range(0, len(names), args.batch_size)]
    progress, continuity = data.Progress(len(batches) * n_clips * steps), Continuity()
    with autocast(device, args.precision):
        for b, batch in enumerate(batches):
            videos = f"videos {b * args.batch_size + 1}-{b * args.batch_size + len(batch)} of {len(names)}"
            first = b * args.batch_size
            label = None if labels is None else torch.tensor(labels[first: first + len(batch)], device=device)
            sample_batch(args, autoencoder, diffusion, batch, batch_generator(args.seed, b, device),
                         sampler_progress(progress, videos, n_clips), continuity, steps=steps, eta=eta,
                         guidance=args.cfg, label=label, class_guidance=args.class_cfg)
    progress.close()
    if args.save_latents:
        save_overview(args.out, names)
    elapsed = time.time() - progress.start
    print(f"wrote {len(names)} video(s) of {args.frames} frames at {autoencoder.cfg.resolution}x"
          f"{autoencoder.cfg.resolution} to {args.out}/ in {data.fmt_time(elapsed)} "
          f"({elapsed / (len(names) * n_clips):.2f} s per clip per video)", file=sys.stderr)
    change = continuity.means()
    if change["across"] is not None:
        print(f"frame-to-frame change: {change['within']:.1f} grey levels inside clips, {change['across']:.1f} "
              "across the joins where a clip's new frames meet the frames before (alike when clips continue)",
              file=sys.stderr)

    # how these videos were made: evaluate.py prints it with every FVD
    info = {"sampler": args.sampler, "steps": steps, "eta": eta, "cfg": args.cfg, "ema": not args.no_ema,
            "classes": labels and [classes[y] for y in labels], "class_cfg": args.class_cfg,
            "frames": args.frames, "resolution": autoencoder.cfg.resolution, "num_videos": args.num_videos,
            "seed": args.seed, "diffusion": args.diffusion, "autoencoder": args.autoencoder,
            "diffusion_step": train_step, "batch_size": args.batch_size, "precision": args.precision,
            "device": str(device), "fps": args.fps, "frame_change": {k: v and round(v, 2) for k, v in change.items()}}
    with open(os.path.join(args.out, "samples.json"), "w") as f:
        json.dump(info, f, indent=2)


if __name__ == "__main__":
    run_cleanly(main)
