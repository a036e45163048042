"""Tests for data.py: each writes the small videos and frame folders it needs under tmp_path."""

import argparse
import os
import warnings

import av
import imageio.v3 as iio
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import data

T = 4   # frames per clip in the file tests: keeps every fake video tiny


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Probe results go to a temporary cache, never to the user's ~/.cache."""
    monkeypatch.setattr(data, "CACHE_DIR", tmp_path / "cache")


def stamped_frames(n, h=48, w=64, channels=3):
    """Frame k is a flat grey of level 20 + 5 k, so a clip's means tell which frames it holds."""
    levels = (20 + 5 * np.arange(n)).astype(np.uint8)
    return np.broadcast_to(levels[:, None, None, None], (n, h, w, channels)).copy()


def write_video(path, n, codec="mpeg4", **size):
    """A video file of n stamped frames. Through PyAV itself: imageio's pyav writer spends about
    0.4 s closing each file, which would make these tests slow."""
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = stamped_frames(n, **size)
    if path.suffix == ".gif":
        iio.imwrite(path, frames, duration=40, loop=0)
        return path
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=25)
        stream.height, stream.width, stream.pix_fmt = *frames.shape[1:3], "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())                                  # flush the encoder
    return path


def write_frames(folder, n, channels=3, h=30, w=40):
    folder.mkdir(parents=True, exist_ok=True)
    for k, frame in enumerate(stamped_frames(n, h, w, channels)):
        iio.imwrite(folder / f"{k + 1}.{'png' if channels in (2, 4) else 'jpg'}",
                    frame[..., 0] if channels == 1 else frame)
    return folder


def frame_levels(clip):
    """Mean grey level (0-255) of each frame of a (3, T, R, R) clip."""
    return ((clip.mean(dim=(0, 2, 3)) + 1) * 127.5).numpy()


def build(name, root, split="all", **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dataset = data.make_dataset(name, root, resolution=16, frames=T, split=split, **kw)
    return dataset, [str(w.message) for w in caught]


# ---------------------------------------------------------------------------------------------
# Synthetic
# ---------------------------------------------------------------------------------------------

def test_synthetic_clip_shape_range_and_determinism():
    d = data.make_dataset("synthetic", resolution=24, frames=8)
    x = d[5]
    assert x.shape == (3, 8, 24, 24) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    assert torch.equal(x, data.make_dataset("synthetic", resolution=24, frames=8)[5])
    assert not torch.equal(x, data.make_dataset("synthetic", resolution=24, frames=8, seed=1)[5])
    # The content moves: consecutive frames differ.
    assert (x[:, 1:] - x[:, :-1]).abs().amax() > 0.1


def test_synthetic_epoch_changes_start_not_content():
    d = data.make_dataset("synthetic", resolution=16, frames=8)
    starts0 = [d.frame_ids(i)[0][0] for i in range(20)]
    d.set_epoch(1)
    starts1 = [d.frame_ids(i)[0][0] for i in range(20)]
    assert starts0 != starts1
    fresh = data.make_dataset("synthetic", resolution=16)
    assert torch.equal(d.render(3, range(8)), fresh.render(3, range(8)))


def test_synthetic_has_the_requested_shapes_with_soft_edges():
    d = data.SyntheticVideos(resolution=64, frames=1, num_shapes=3)
    background, shapes = d.video_params(0)
    assert len(shapes) == 3
    frame = d.render(0, [0])[:, 0]                                  # (3, R, R)
    # Anti-aliasing: some pixels lie strictly between the background and a shape colour.
    values = {tuple(np.round(v, 3)) for v in frame.reshape(3, -1).T.tolist()}
    assert len(values) > 3 + 1


def test_synthetic_clips_continue_each_other():
    d = data.make_dataset("synthetic", resolution=16, frames=8, pairs=True)
    window, has_cond = d[2]
    ids, _ = d.frame_ids(2)
    assert window.shape == (3, 16, 16, 16) and has_cond.dtype == torch.bool and has_cond
    assert np.array_equal(ids[8:], ids[:8] + 8)                    # the second clip follows on
    assert torch.equal(window[:, :8], d.render(2, ids[:8]))
    assert torch.equal(window[:, 8:], d.render(2, ids[8:]))


def test_synthetic_splits_are_disjoint_and_all_is_both():
    train = data.make_dataset("synthetic", split="train", resolution=16)
    test = data.make_dataset("synthetic", split="test", resolution=16)
    both = data.make_dataset("synthetic", split="all", resolution=16)
    assert len(both) == len(train) + len(test) and len(test) > 0
    assert not torch.equal(train.render(0, range(4)), test.render(0, range(4)))
    assert torch.equal(both.render(len(train), range(4)), test.render(0, range(4)))


def test_same_clips_with_any_number_of_workers_and_set_epoch_reaches_them():
    d = data.make_dataset("synthetic", resolution=8, frames=4)
    subset = torch.utils.data.Subset(d, range(8))
    batches = {}
    for epoch in (0, 1):
        d.set_epoch(epoch)
        for workers in (0, 2):
            batches[epoch, workers] = torch.cat(list(DataLoader(subset, batch_size=4,
                                                                num_workers=workers)))
    assert torch.equal(batches[0, 0], batches[0, 2]) and torch.equal(batches[1, 0], batches[1, 2])
    assert not torch.equal(batches[0, 2], batches[1, 2])


# ---------------------------------------------------------------------------------------------
# UCF-101
# ---------------------------------------------------------------------------------------------

def fake_ucf(root, split_files=True):
    """Two classes, groups 1 (test) and 8 (train), plus four broken files in the train groups."""
    videos = root / "UCF-101"
    for cls in ["ApplyLipstick", "HandstandPushups"]:
        for group in [1, 8]:
            # The real lists spell some class names with other capitals than the folders.
            name = "HandStandPushups" if cls == "HandstandPushups" else cls
            write_video(videos / cls / f"v_{name}_g{group:02d}_c01.avi", 10)
    broken = videos / "ApplyLipstick"
    (broken / "v_ApplyLipstick_g09_c01.avi").write_bytes(b"")
    (broken / "v_ApplyLipstick_g09_c02.avi").write_text("not a video")
    write_video(broken / "v_ApplyLipstick_g09_c03.avi", T - 1)                      # too short
    good = (broken / "v_ApplyLipstick_g08_c01.avi").read_bytes()
    (broken / "v_ApplyLipstick_g09_c04.avi").write_bytes(good[: len(good) // 3])    # truncated
    if split_files:
        lists = root / "ucfTrainTestlist"
        lists.mkdir()
        train = [p.relative_to(videos) for p in videos.rglob("*_g0[89]_*.avi")]
        lists.joinpath("trainlist01.txt").write_text(
            "".join(f"{str(p).replace('HandStand', 'Handstand', 1)} 1\n" for p in train))
        lists.joinpath("testlist01.txt").write_text(
            "ApplyLipstick/v_ApplyLipstick_g01_c01.avi\n"
            "HandstandPushups/v_HandStandPushups_g01_c01.avi\n")
    return root


def test_ucf101_official_split(tmp_path):
    root = fake_ucf(tmp_path)
    train, messages = build("ucf101", root, "train")
    test, _ = build("ucf101", root, "test")
    everything, _ = build("ucf101", root, "all")
    assert (len(train), len(test), len(everything)) == (2, 2, 4)
    assert {p.name for p in test.sources} == {"v_ApplyLipstick_g01_c01.avi",
                                              "v_HandStandPushups_g01_c01.avi"}
    assert any("skipped 4 of 6" in m for m in messages)
    x = train[0]
    assert x.shape == (3, T, 16, 16) and x.min() >= -1 and x.max() <= 1


def test_ucf101_without_split_files_uses_the_group_rule(tmp_path):
    root = fake_ucf(tmp_path, split_files=False)
    train, messages = build("ucf101", root, "train")
    test, _ = build("ucf101", root, "test")
    assert (len(train), len(test)) == (2, 2)
    assert sum("not found" in m for m in messages) == 1
    assert all("_g01_" in p.name for p in test.sources)


@pytest.mark.parametrize("make_root", [
    lambda tmp: tmp / "missing",
    lambda tmp: tmp,
    lambda tmp: (tmp / "notes.txt").write_text("hi") and tmp,
], ids=["missing", "empty", "wrong-layout"])
def test_ucf101_bad_root_names_the_layout(tmp_path, make_root):
    with pytest.raises(data.DataError, match=r"UCF-101/<Class>/v_<Class>_gXX_cYY\.avi"):
        data.make_dataset("ucf101", make_root(tmp_path))


def test_no_data_dir_is_a_clear_error():
    with pytest.raises(data.DataError, match="needs --data-dir"):
        data.make_dataset("sky")


def test_nothing_usable_is_an_error(tmp_path):
    (tmp_path / "UCF-101" / "A").mkdir(parents=True)
    (tmp_path / "UCF-101" / "A" / "v_A_g01_c01.avi").write_bytes(b"")
    with pytest.raises(data.DataError, match="none of the 1 videos"):
        data.make_dataset("ucf101", tmp_path, split="all")


# ---------------------------------------------------------------------------------------------
# SkyTimelapse
# ---------------------------------------------------------------------------------------------

def fake_sky(root):
    write_frames(root / "sky_train" / "v1" / "v1_1", 12)                # 1.jpg ... 12.jpg
    write_frames(root / "sky_train" / "v1" / "v1_2", 6, channels=1)     # grey jpgs
    write_frames(root / "sky_train" / "v2" / "v2_1", T - 1)             # too short
    write_frames(root / "sky_test" / "v3" / "v3_1", 6, h=31, w=45)      # odd size
    return root


def test_sky_splits_order_and_conversion(tmp_path):
    root = fake_sky(tmp_path)
    train, messages = build("sky", root, "train")
    test, _ = build("sky", root, "test")
    everything, _ = build("sky", root, "all")
    assert (len(train), len(test), len(everything)) == (2, 1, 3)
    assert any("skipped 1 of 3" in m for m in messages)
    # Numeric order: 2.jpg comes before 10.jpg, so the stamped levels rise by 12 per frame.
    clip = train.read_clip(0, np.arange(8, 12))
    assert np.allclose(frame_levels(clip), 20 + 5 * np.arange(8, 12), atol=2.4)
    grey, odd = train[1], test[0]
    assert grey.shape == odd.shape == (3, T, 16, 16)
    assert torch.allclose(grey[0], grey[1]) and torch.allclose(grey[1], grey[2])


def test_sky_missing_test_folder_names_the_layout(tmp_path):
    write_frames(tmp_path / "sky_train" / "v1" / "v1_1", 6)
    with pytest.raises(data.DataError, match=r"sky_test/<video>/<clip>/\*\.jpg"):
        data.make_dataset("sky", tmp_path, split="test")


# ---------------------------------------------------------------------------------------------
# Any folder
# ---------------------------------------------------------------------------------------------

def fake_folder(root):
    write_video(root / "a.mp4", 40, codec="libx264")                  # B-frames, one keyframe
    write_video(root / "b.avi", 40, h=40, w=30)                        # keyframe every 12 frames
    write_video(root / "c.gif", 8)
    write_frames(root / "frames" / "rgba", 6, channels=4)
    (root / "empty.mp4").write_bytes(b"")
    mp4 = (root / "a.mp4").read_bytes()
    (root / "truncated.mp4").write_bytes(mp4[: len(mp4) // 2])
    (root / "readme.txt").write_text("not data")
    return root


def test_folder_finds_videos_and_frame_folders_and_skips_broken(tmp_path):
    root = fake_folder(tmp_path)
    d, messages = build("folder", root)
    assert sorted(p.name for p in d.sources) == ["a.mp4", "b.avi", "c.gif", "rgba"]
    assert any("skipped 2 of 6" in m for m in messages)
    for i in range(len(d)):
        x = d[i]
        assert x.shape == (3, T, 16, 16) and x.min() >= -1 and x.max() <= 1


@pytest.mark.parametrize("name", ["a.mp4", "b.avi", "c.gif"])
def test_clips_hold_exactly_the_frames_of_a_full_decode(tmp_path, name):
    """Seeking must land on the right frames, late in the file too (far from the keyframe)."""
    d, _ = build("folder", fake_folder(tmp_path))
    index = [p.name for p in d.sources].index(name)
    everything = iio.imread(d.sources[index], plugin="pyav", index=...)
    assert len(everything) == d.lengths[index]
    for start in (0, d.lengths[index] // 2, d.lengths[index] - T):
        ids = start + np.arange(T)
        assert torch.equal(d.read_clip(index, ids), data.resize_crop(everything[ids], 16))


def test_folder_split_is_fixed_and_complete(tmp_path):
    for k in range(20):
        write_frames(tmp_path / f"clip{k:02d}", T)
    train, messages = build("folder", tmp_path, "train")
    test, _ = build("folder", tmp_path, "test")
    assert len(train) + len(test) == 20 and len(test) > 0
    assert not {p.name for p in train.sources} & {p.name for p in test.sources}
    assert any("--split all" in m for m in messages)


def test_empty_folder_names_the_layout(tmp_path):
    with pytest.raises(data.DataError, match="video files"):
        data.make_dataset("folder", tmp_path)


# ---------------------------------------------------------------------------------------------
# Pairs, conversion, cache, flags
# ---------------------------------------------------------------------------------------------

def test_pairs_mark_videos_too_short_for_two_clips(tmp_path):
    write_frames(tmp_path / "short", 2 * T - 1)
    write_frames(tmp_path / "long", 2 * T)
    d, _ = build("folder", tmp_path, pairs=True)
    by_name = {p.name: d[i] for i, p in enumerate(d.sources)}
    window, has_cond = by_name["short"]
    assert window.shape == (3, 2 * T, 16, 16) and not has_cond
    assert torch.equal(window[:, :T], window[:, T:])
    window, has_cond = by_name["long"]
    assert has_cond
    assert np.allclose(frame_levels(window), 20 + 5 * np.arange(2 * T), atol=2.4)


def test_grey_alpha_and_rgba_become_rgb():
    for shape in [(5, 7), (5, 7, 1), (5, 7, 2), (5, 7, 4)]:
        image = np.full(shape, 9, dtype=np.uint8)
        assert data.to_rgb(image).shape == (5, 7, 3)


def test_resize_crop_keeps_the_centre():
    frames = np.zeros((1, 20, 40, 3), dtype=np.uint8)
    frames[:, :, 10:30] = 255                                           # the centre square is white
    clip = data.resize_crop(frames, 8)
    assert clip.shape == (3, 1, 8, 8) and torch.allclose(clip, torch.ones_like(clip))


def test_probe_results_are_cached_until_the_file_changes(tmp_path, monkeypatch):
    video = write_video(tmp_path / "v.avi", 10)
    build("folder", tmp_path, "all")
    monkeypatch.setattr(data, "probe_video", lambda path: pytest.fail("probed again"))
    build("folder", tmp_path, "all")
    os.utime(video, ns=(1, 1))
    with pytest.raises(pytest.fail.Exception):
        build("folder", tmp_path, "all")


def test_a_video_that_breaks_after_probing_is_replaced_with_a_warning(tmp_path):
    write_frames(tmp_path / "a", T)
    write_frames(tmp_path / "b", T)
    d, _ = build("folder", tmp_path)
    (tmp_path / "a" / "2.jpg").write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="failed to decode"):
        x = d[0]
    assert torch.equal(x, d[1])


def test_add_data_args():
    args = data.add_data_args(argparse.ArgumentParser()).parse_args(
        ["--data", "ucf101", "--data-dir", "/d", "--split", "all", "--frame-stride", "2"])
    assert (args.data, args.data_dir, args.split, args.frame_stride) == ("ucf101", "/d", "all", 2)
    assert data.add_data_args(argparse.ArgumentParser()).parse_args([]).data == "synthetic"


def test_frame_stride_skips_frames(tmp_path):
    write_frames(tmp_path / "v", 12)
    d, _ = build("folder", tmp_path, frame_stride=3)
    ids, _ = d.frame_ids(0)
    assert np.array_equal(np.diff(ids), [3] * (T - 1)) and ids[-1] < 12
    assert np.allclose(frame_levels(d[0]), 20 + 5 * ids, atol=2.4)
