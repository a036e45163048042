"""Tests of bench.py's estimators at tiny sizes, so the benchmark cannot silently break. No timing asserts.
Run: python -m pytest -q test_bench.py (CPU, about 20 seconds)."""
import functools
from functools import partial

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

import bench
import pvdm


def test_conv_flops_equal_the_closed_form():
    # 2 FLOPs per multiply-add: 2 * C_in * C_out * (kernel volume) * (output positions)
    with FakeTensorMode():
        x2, w2 = torch.randn(2, 3, 16, 16), torch.randn(8, 3, 3, 3)
        x3, w3 = torch.randn(2, 3, 8, 16, 16), torch.randn(8, 3, 1, 3, 3)
        assert bench.count_flops(lambda: F.conv2d(x2, w2, padding=1)) == 2 * 3 * 8 * 9 * (2 * 16 * 16)
        assert bench.count_flops(lambda: F.conv2d(x2, w2, stride=2)) == 2 * 3 * 8 * 9 * (2 * 7 * 7)
        assert bench.count_flops(lambda: F.conv3d(x3, w3, padding=(0, 1, 1))) == 2 * 3 * 8 * 9 * (2 * 8 * 16 * 16)


def test_attention_flops_are_counted_on_cpu():
    # torch's counter has no formula for the CPU flash kernel; bench registers one: QK^T and AV
    b, h, n, d = 2, 4, 64, 16
    with FakeTensorMode():
        q = torch.randn(b, h, n, d, requires_grad=True)
        assert bench.count_flops(lambda: F.scaled_dot_product_attention(q, q, q)) == 2 * (2 * b * h * n * n * d)
        total = bench.count_flops(lambda: F.scaled_dot_product_attention(q, q, q).sum().backward())
    assert total == 3.5 * 2 * (2 * b * h * n * n * d)  # backward: 2.5 times forward (torch's formula)


def test_memory_estimate_is_close_to_the_measured_cpu_peak():
    # The estimate (fake tensors + MemTracker) against the CPU allocator's own record of a real step.
    # Measured here they agree to 0.1%; the factor 1.05 leaves room for scratch buffers a kernel may
    # allocate on some CPUs (oneDNN), which the allocator sees and fake tensors do not.
    work = bench.small_workload()
    for batch in (1, 4):
        estimate = bench.estimate_train_memory(work, batch, "fp32", ckpt=False)
        measured = bench.measured_cpu_peak(work, batch)
        assert 1 / 1.05 < estimate / measured < 1.05, (batch, estimate, measured)


def test_checkpointing_and_bf16_reduce_the_estimate():
    work = bench.small_workload()
    fp32 = bench.estimate_train_memory(work, 8, "fp32", ckpt=False)
    assert bench.estimate_train_memory(work, 8, "fp32", ckpt=True) < fp32
    assert bench.estimate_train_memory(work, 8, "bf16", ckpt=False) < fp32


def test_largest_batch_is_monotone_in_gpu_memory_and_fits():
    work = bench.small_workload()
    memory_at = functools.cache(lambda b: bench.estimate_train_memory(work, b, "fp32", ckpt=False))
    budgets = [memory_at(1) * f for f in (0.5, 1.0, 4.0, 20.0)]
    batches = [bench.largest_batch(memory_at, budget) for budget in budgets]
    assert batches == sorted(batches) and batches[0] == 0 and batches[-1] > 1
    for budget, b in zip(budgets, batches):
        assert b == 0 or memory_at(b) <= budget


def test_largest_batch_searches_when_memory_is_not_linear():
    memory_at = lambda b: 10 + b + (b * b if b > 4 else 0)  # steeper than the line through b = 1, 2
    assert bench.largest_batch(memory_at, 40) == 5  # 10 + 5 + 25 = 40 fits; b = 6 needs 52
    assert bench.largest_batch(lambda b: 100 + 10 * b, 10_000) == 990  # affine: exact
    # the line through b = 1, 2 overestimates the growth (b = 1 cheap, then slower): search upwards
    assert bench.largest_batch(lambda b: 10 if b == 1 else 28 + b, 100) == 72


def test_pixel_baseline_matches_the_triplane_unet_in_parameters_and_shapes():
    ucfg = pvdm.unet_config_for(pvdm.AutoencoderConfig(**pvdm.AUTOENCODER_PRESETS["tiny"]), "tiny")
    cfg = bench.matched_pixel_config(ucfg, resolution=16, frames=4)
    pixel = bench.count_parameters(partial(bench.PixelUNet, cfg))
    triplane = bench.count_parameters(partial(pvdm.TriplaneUNet, ucfg))
    assert abs(pixel / triplane - 1) < 0.2
    unet = bench.PixelUNet(cfg)
    x = torch.randn(2, 3, 4, 16, 16)
    assert unet(x, torch.tensor([3, 700])).shape == x.shape
