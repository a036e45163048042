"""
Sample videos of any length from a trained PVDM: clip 1 unconditionally, then each clip conditioned
on the latent of the clip before it (paper section 3.3), decoded and written as it comes.

    python sample.py --frames 128                 # 4 videos: samples/video_0000.mp4, ...
    python sample.py --frames 128 --save-latents  # also every clip's three latent planes, as images
"""
import argparse
import gc
import json
import os
import re
import sys
import time
from stat import S_ISREG

import imageio.v3 as iio
import numpy as np
import torch

import data
import pvdm
from runtime import (add_device_args, autocast, fail, finite_float, float_in, int_in,
                     load_diffusion, non_negative_int, positive_int, run_cleanly, settle_device,
                     take_lock)


QUICK_START = "runs/diffusion/diffusion.pt"
SHIPPED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pretrained", "diffusion.pt")
DDPM = "ddpm runs all T steps with eta 1"


def frame_change(totals, before, frames):
    """Add to totals {"within" | "across": [sum, count]} the mean absolute change (grey levels)
    inside a clip (<=T, H, W, 3) and from `before` (a frame or None) to it; return its last."""
    frames = frames.astype(np.float64)
    pairs = {"within": np.diff(frames, axis=0),
             "across": frames[:1] - before if before is not None else frames[:0]}  # (n, H, W, 3)
    for key, diff in pairs.items():
        totals[key][0] += np.abs(diff).mean(axis=(1, 2, 3)).sum()
        totals[key][1] += len(diff)
    return frames[-1]


EARLIER = re.compile(r"samples\.json|overview\.png|video_\d{4,}\.(?:mp4|gif|png)"
                     r"|latents/video_\d{4,}_clip\d+_z[shw]\.png")  # what a sampling writes


def prepare_out(args):
    """Lock --out; refuse other videos there, and an earlier sampling (--overwrite removes it)."""
    out, latents = args.out, os.path.join(args.out, "latents")
    take_lock(out)
    folder = os.path.isdir(latents)
    files = os.listdir(out) + [f"latents/{f}" for f in (os.listdir(latents) if folder else ())]
    earlier = sorted(f for f in files if EARLIER.fullmatch(f))
    others = sorted(f for f in files if f.endswith((".mp4", ".gif")) and f not in earlier)  # FVD
    special = [f for f in earlier if not S_ISREG(os.lstat(os.path.join(out, f)).st_mode)]
    problem = (f"{latents} is a file, where --save-latents puts its folder; move it away"
               if args.save_latents and os.path.lexists(latents) and not folder else
               f"{os.path.join(out, special[0])} is not a regular file; remove it" if special else
               f"{out} holds {len(others)} other video(s) such as {others[0]}; remove them"
               if others else f"{out} holds an earlier sampling ({len(earlier)} files, such as "
               f"{earlier[0]}); pass --overwrite to replace them (all are removed first)"
               if earlier and not args.overwrite else None)
    if problem:  # a FIFO would hang the writer
        fail(f"{problem}, or pick another --out.")
    for f in earlier:
        os.remove(os.path.join(out, f))
    if args.save_latents:
        os.makedirs(latents, exist_ok=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Sample long videos from a trained PVDM, clip by clip.")
    p.add_argument("--diffusion", default=QUICK_START if os.path.exists(QUICK_START) else SHIPPED,
                   help=f"stage-2 checkpoint (default: {QUICK_START} if there, else "
                        f"{os.path.relpath(SHIPPED)})")
    p.add_argument("--autoencoder", help="stage-1 checkpoint (default: the one --diffusion names)")
    p.add_argument("--frames", type=positive_int, help="frames per video (default: one clip)")
    p.add_argument("--num-videos", type=positive_int, default=4)
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--sampler", choices=["ddim", "ddpm"], default="ddim", help=DDPM)
    p.add_argument("--steps", type=positive_int, help="DDIM steps (default 50; the paper: 400)")
    p.add_argument("--eta", type=float_in(0), help="DDIM noise: 0 deterministic, 1 (default) DDPM")
    p.add_argument("--cfg", type=finite_float, default=0.0, help="guidance on the previous clip")
    p.add_argument("--class", dest="classes", nargs="+", metavar="NAME", help="a class by name, "
                   "or number from 1 (UCF-101: classInd.txt's); one for all videos, or one each")
    p.add_argument("--class-cfg", type=float_in(0), default=0.0, help="guidance on the class")
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--out", default="samples")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier sampling")
    p.add_argument("--format", nargs="+", choices=["mp4", "gif"], default=["mp4"])
    p.add_argument("--fps", type=int_in(1, 240), default=8)
    add_device_args(p)
    p.add_argument("--no-ema", action="store_true", help="the raw weights, not their EMA")
    p.add_argument("--save-latents", action="store_true", help="also latent PNGs, overview.png")
    args = p.parse_args(argv)
    if args.sampler == "ddpm" and (args.steps, args.eta) != (None, None):
        p.error(f"--sampler {DDPM}; drop --steps/--eta or use ddim.")
    args.eta = 1.0 if args.eta is None else args.eta
    if args.class_cfg and not args.classes:
        p.error("--class-cfg guides towards --class; add --class NAME or drop it.")
    if args.classes and len(args.classes) not in (1, args.num_videos):
        p.error(f"--class takes one class for all videos or one per video ({args.num_videos}); "
                f"got {len(args.classes)}.")
    settle_device(args)
    return args


def video_labels(asked, known, path, num_videos):
    """Each video's class index from --class, or None: a name in any case, else (unless a class
    is named by a number) its number from 1, as in UCF-101's classInd.txt."""
    if not asked:
        return None
    if not known or not all(isinstance(name, str) for name in known):
        why = ("holds class names that are not text (damaged); train it again" if known else
               "was trained without classes; drop --class, or train")
        fail(f"{path} {why} with train_diffusion.py --class-cond.")
    lower, numbered = [name.lower() for name in known], not any(c.isdigit() for c in known)
    labels = []
    for name in asked:
        if name.lower() in lower:  # the exact spelling first: classes may differ only in case
            labels.append(known.index(name) if name in known else lower.index(name.lower()))
        elif numbered and name.isascii() and name.isdigit() and 0 < int(name) <= len(known):
            labels.append(int(name) - 1)
        else:
            shown = ", ".join(f"{i + 1} {c}" if numbered else c for i, c in enumerate(known[:12]))
            more = f", ... ({len(known)} in all)" * (len(known) > 12)
            fail(f"{path} knows no class {name!r}; ask by name"
                 f"{' or number' * numbered}: {shown}{more}.")
    return labels * num_videos if len(labels) == 1 else labels


def batch_generator(seed, index, device):
    """Batch `index`'s generator: no two (seed, index) share noise, as seed + index would."""
    state = np.random.SeedSequence([seed, index]).generate_state(2, dtype=np.uint32)
    return torch.Generator(device).manual_seed(int(state[0]) << 32 | int(state[1]))


def sampler_progress(progress, videos, n_clips):
    """The sampler's callback after step i of `steps`: where this batch is."""
    return lambda i, steps: progress.advance(
        f"{videos} | clip {progress.done // steps % n_clips + 1}/{n_clips} | step {i}/{steps}")


def sample_batch(args, autoencoder, diffusion, names, generator, progress, change, label=None):
    """One batch of videos, clip by clip, each clip's new frames appended to their files."""
    every, made = max(1, autoencoder.cfg.frames // 4), 0  # contact sheets: every 4th of 16 frames
    sheets, last = [[] for _ in names], [None] * len(names)
    paths = [os.path.join(args.out, f"{name}.{fmt}") for fmt in args.format for name in names]
    with data.video_writers(paths, args.fps) as writers:
        clips = pvdm.generate_video(
            autoencoder, diffusion, args.frames, n=len(names), steps=args.steps, eta=args.eta,
            guidance=args.cfg, label=label, class_guidance=args.class_cfg, generator=generator,
            progress=progress)
        for k, (video, z) in enumerate(clips):  # video (n, 3, <=T, H, W): new frames; z (n, C, N)
            if not torch.isfinite(z).all():  # never a black video passed off as a sample
                guide = " or ".join(f"--{flag} {w:g}" for flag, w in (
                    ("cfg", args.cfg), ("class-cfg", args.class_cfg)) if w)
                fix = f"lower {guide}" if guide else "sample an earlier checkpoint"
                fail(f"sampling gave NaN or inf latents in clip {k + 1}; {fix}.")
            planes = pvdm.unpack(z, *autoencoder.cfg.latent_size)
            shown = [j for j in range(video.shape[2]) if (made + j) % every == 0]
            for i, name in enumerate(names):
                frames = data.to_uint8(video[i])  # (<=T, H, W, 3)
                for writer in writers[i::len(names)]:  # one per --format
                    writer.append(frames)
                last[i] = frame_change(change, last[i], frames)
                sheets[i].append(video[i, :, shown].float().cpu())  # (3, <=4, H, W)
                if args.save_latents:
                    prefix = os.path.join(args.out, "latents", f"{name}_clip{k:02d}")
                    data.save_latent_images(prefix, [p[i] for p in planes])
            made += video.shape[2]
    for name, shown in zip(names, sheets):  # a row per clip length, whatever the overlap
        data.save_frame_strip(os.path.join(args.out, f"{name}.png"),
                              torch.cat(shown, dim=1).split(4, dim=1))


def save_overview(out, names):
    """The README's picture: the first contact sheets, then the first clip's latent planes."""
    read = lambda path: iio.imread(os.path.join(out, path))[..., :3]  # noqa: E731
    planes = [read(f"latents/{names[0]}_clip00_{p}.png") for p in ("zs", "zh", "zw")]
    images = [read(f"{name}.png") for name in names[:4]] + [data.join_images(planes, 8, axis=0)]
    iio.imwrite(os.path.join(out, "overview.png"), data.join_images(images, 8))


def main(argv=None):
    args = parse_args(argv)
    say = lambda text: print(text, file=sys.stderr)  # noqa: E731
    say(f"model: {args.diffusion}" + " (shipped: pretrained/)"
        * (os.path.abspath(args.diffusion) == SHIPPED))
    device = torch.device(args.device)
    autoencoder, diffusion, train_step, args.autoencoder = load_diffusion(
        args.diffusion, device, args.autoencoder, ema=not args.no_ema)
    gc.freeze()  # imageio collects garbage as it closes each file: leave the models out
    T = diffusion.cfg.timesteps
    steps = args.steps = T if args.sampler == "ddpm" else args.steps or 50
    if steps > T:
        fail(f"--steps {steps} exceeds the model's {T} timesteps; lower it.")
    classes = diffusion.model.cfg.classes
    labels = video_labels(args.classes, classes, args.diffusion, args.num_videos)  # or None
    named = labels and [classes[y] for y in labels]
    clip, overlap, size = autoencoder.cfg.frames, diffusion.cfg.overlap, autoencoder.cfg.resolution
    args.frames = args.frames or clip
    n_clips = pvdm.clips_needed(args.frames, clip, overlap)
    prepare_out(args)
    asked = named and f"classes {sorted(set(named))}, class cfg {args.class_cfg}, "
    say(f"sampling {args.num_videos} video(s) of {args.frames} frames ({n_clips} clip(s) of {clip} "
        f"sharing {overlap} frames) with {args.sampler} {steps} steps, eta {args.eta}, cfg "
        f"{args.cfg}, {asked or ''}{'raw' if args.no_ema else 'EMA'} weights of step {train_step}, "
        f"on {device} in {args.precision}")

    # each batch has its own seeded generator: the videos do not depend on timing
    names = [f"video_{i:04d}" for i in range(args.num_videos)]
    starts = range(0, len(names), args.batch_size)
    progress = data.Progress(len(starts) * n_clips * steps)
    change = {"within": [0, 0], "across": [0, 0]}  # see frame_change
    with autocast(device, args.precision):
        for b, first in enumerate(starts):
            batch = names[first: first + args.batch_size]
            label = labels and torch.tensor(labels[first: first + len(batch)], device=device)
            where = f"videos {first + 1}-{first + len(batch)} of {len(names)}"
            sample_batch(args, autoencoder, diffusion, batch, batch_generator(args.seed, b, device),
                         sampler_progress(progress, where, n_clips), change, label)
    progress.close()
    if args.save_latents:
        save_overview(args.out, names)
    took = time.time() - progress.start
    within, across = (total / count if count else None for total, count in change.values())
    say(f"wrote {len(names)} video(s) of {args.frames} frames at {size}x{size} to {args.out}/ in "
        f"{data.fmt_time(took)} ({took / (len(names) * n_clips):.2f} s per clip per video)" + (
            f"; change per frame: {within:.1f} grey levels inside clips, {across:.1f} at the "
            "joins" if across is not None else ""))

    # how these videos were made: evaluate.py prints it with every FVD
    info = vars(args) | {"ema": not args.no_ema, "classes": named, "diffusion_step": train_step,
                         "resolution": size, "frame_change": {
                             k: v and round(v, 2) for k, v in zip(change, (within, across))}}
    with open(os.path.join(args.out, "samples.json"), "w") as f:
        json.dump(info, f, indent=2)


if __name__ == "__main__":
    run_cleanly(main)
