"""internal_batch_size: a caller's value, the CPU's fixed sizes, and on a GPU the size its free memory holds
(neuroexplain.attribution.batching)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from neuroexplain.attribution import Method, batching, parse_options
from neuroexplain.attribution.batching import MARGIN, MAX_AUTO, auto_batch, evaluations, internal_batch, volume_bytes
from neuroexplain.attribution.options import CPU_BATCH

BATCHED = sorted(CPU_BATCH, key=lambda m: m.value)


def _net() -> nn.Module:
    return nn.Sequential(nn.Conv3d(1, 2, 3, padding=1), nn.ReLU(), nn.Conv3d(2, 1, 3, padding=1)).eval()


def test_the_estimate_counts_what_autograd_saves_and_the_largest_outputs() -> None:
    # One volume: 64 float32 = 256 bytes; the layers' outputs are 512, 512 and 256 bytes. Autograd saves the input
    # (for the first convolution) and the ReLU's output (the ReLU, and the second convolution's input): 256 + 512.
    x = torch.zeros(3, 1, 4, 4, 4)
    assert volume_bytes(_net(), x, grad=True) == int(MARGIN * ((256 + 512) + (512 + 512) + 256))
    assert volume_bytes(_net(), x, grad=False) == int(MARGIN * ((512 + 512) + 2 * 256))
    bigger = torch.zeros(1, 1, 8, 8, 8)
    assert volume_bytes(_net(), bigger, grad=True) == 8 * volume_bytes(_net(), x, grad=True)  # per shape, not cached


def test_the_auto_size_is_what_half_the_free_memory_holds_within_the_evaluations() -> None:
    gb = 1 << 30
    assert auto_batch(gb, 10 * gb, 32) == 5
    assert auto_batch(gb // 10, 10 * gb, 32) == 32  # no more volumes than the method evaluates
    assert auto_batch(1, 10 * gb, 10_000) == MAX_AUTO
    assert auto_batch(gb, gb // 2, 32) == 1  # never 0: the request then runs, or reports running out of memory


@pytest.mark.parametrize("method", BATCHED, ids=lambda m: m.value)
def test_a_callers_size_is_kept_and_auto_on_the_cpu_is_the_fixed_size(method: Method) -> None:
    x = torch.zeros(1, 1, 8, 8, 8)
    assert internal_batch(method, parse_options(method, {"internal_batch_size": 3}), _net(), x) == 3
    opts = parse_options(method, {})
    assert opts["internal_batch_size"] == batching.AUTO
    assert internal_batch(method, opts, _net(), x) == CPU_BATCH[method]


def test_on_a_device_that_reports_free_memory_auto_follows_it(monkeypatch: pytest.MonkeyPatch) -> None:
    # The CUDA query itself needs a GPU (bench/gpu.sh runs it); here the device's answer is given, the rest is real.
    x = torch.zeros(1, 1, 8, 8, 8)
    per = volume_bytes(_net(), x, grad=True)
    monkeypatch.setattr(batching, "free_bytes", lambda device: 2 * per * 5)
    opts = parse_options(Method.INTEGRATED_GRADIENTS, {"n_steps": 32})
    assert internal_batch(Method.INTEGRATED_GRADIENTS, opts, _net(), x) == 5
    occlusion = parse_options(Method.OCCLUSION, {"patch": 4, "stride": 4})
    assert evaluations(Method.OCCLUSION, occlusion, (8, 8, 8)) == 8
    # without gradients a volume costs less, so more of them fit in the same memory
    assert volume_bytes(_net(), x, grad=False) < per
    assert internal_batch(Method.OCCLUSION, occlusion, _net(), x) == 2 * per * 5 // 2 // volume_bytes(_net(), x, grad=False) > 5


def test_evaluations_are_what_each_method_batches() -> None:
    assert evaluations(Method.INTEGRATED_GRADIENTS, parse_options("integrated_gradients", {"n_steps": 20}), ()) == 20
    sg = parse_options("smoothgrad", {"nt_samples": 6, "n_steps": 3})
    assert evaluations(Method.SMOOTHGRAD, sg, ()) == 6
    assert evaluations(Method.SMOOTHGRAD, {**sg, "base": "integrated_gradients"}, ()) == 3
    assert evaluations(Method.GRADIENT_SHAP, parse_options("gradient_shap", {"n_samples": 9}), ()) == 9
    # occlusion: captum's positions, ceil((n - patch) / stride) + 1 per axis
    assert evaluations(Method.OCCLUSION, parse_options("occlusion", {"patch": 4, "stride": 3}), (10, 8, 4)) == 3 * 3 * 1
