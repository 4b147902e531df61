"""Predict's oneDNN Conv3d path: the same numbers as the module as loaded (within 1e-5), the loaded module untouched."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from neuroexplain.models import load_model
from neuroexplain.predict import inference_module, predict_arrays


@pytest.mark.parametrize("name", ["lesion", "atrophy"])
def test_onednn_path_matches_the_loaded_module(name: str) -> None:
    model = load_model(name)
    if not torch.backends.mkldnn.is_available():
        pytest.skip("this torch has no oneDNN")
    rng = np.random.default_rng(0)
    arrays = [rng.random(model.spec.grid.shape, dtype=np.float32) * 1.5 for _ in range(3)]
    fast = predict_arrays(model, arrays, batch_size=1, with_features=True)
    batched = predict_arrays(model, arrays, batch_size=3, with_features=True)
    with torch.inference_mode():
        x = torch.from_numpy(np.stack(arrays))[:, None]
        reference = model.module(x)
    for i, p in enumerate(fast):
        assert np.allclose(p.logits, reference[i].tolist(), rtol=0, atol=1e-5)
        assert np.allclose(p.logits, batched[i].logits, rtol=0, atol=1e-5)
        assert np.allclose(p.features, batched[i].features, rtol=0, atol=1e-5)
        assert len(p.features) > 0


def test_onednn_path_runs_onednn_and_leaves_the_loaded_module_alone() -> None:
    model = load_model("lesion")
    if not torch.backends.mkldnn.is_available():
        pytest.skip("this torch has no oneDNN")
    fast = inference_module(model)
    assert fast is not model.module and inference_module(model) is fast  # built once
    for m in model.module.modules():
        assert "forward" not in m.__dict__  # the shared module keeps nn.Conv3d.forward
    convs = [m for m in fast.modules() if isinstance(m, nn.Conv3d)]
    assert convs and all("forward" in m.__dict__ for m in convs)
    assert all(a is b for a, b in zip(fast.parameters(), model.module.parameters(), strict=True))  # shared weights
    x = torch.rand((1, 1, *model.spec.grid.shape))
    with torch.inference_mode(), torch.profiler.profile() as prof:
        fast(x)
    names = {e.key for e in prof.key_averages()}
    assert "aten::mkldnn_convolution" in names and "aten::slow_conv3d_forward" not in names
    assert "aten::max_pool3d_with_indices" not in names  # the pooling computes no argmax for a backward pass


@pytest.mark.parametrize("shape", [(1, 8, 40, 48, 40), (2, 3, 7, 6, 9), (1, 1, 3, 3, 2), (1, 2, 2, 5, 4)])
def test_pairwise_max_pooling_is_max_pool3d(shape: tuple[int, ...]) -> None:
    # The inference copy's 2x2x2 pooling must give max_pool3d's exact values: odd sizes drop their last plane as
    # floor mode does, and a NaN in a window wins.
    from torch.nn import functional as F

    from neuroexplain.predict import _pairwise_max_pool3d

    x = torch.randn(shape)
    x.view(-1)[::97] = float("nan")
    pool = nn.MaxPool3d(2)
    got, want = _pairwise_max_pool3d(pool, x), F.max_pool3d(x, 2, 2)
    assert got.shape == want.shape
    assert torch.equal(torch.nan_to_num(got, nan=7.0), torch.nan_to_num(want, nan=7.0))
    assert torch.equal(got.isnan(), want.isnan())


def test_a_batch_of_one_runs_on_this_threads_openmp_team_of_one_only(monkeypatch: pytest.MonkeyPatch) -> None:
    # A batch-1 CPU forward runs with one OpenMP thread (faster than two at batch 1, and the other core stays free
    # for the input check beside it); the setting is the calling thread's own and is put back afterwards: torch's
    # process-wide thread count, other threads' and threads started later keep theirs.
    import threading

    from neuroexplain.predict import _one_thread, _openmp

    if _openmp() is None:
        pytest.skip("torch runs without an OpenMP runtime here")
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")  # what serving runs with (it applies only there)
    before = torch.get_num_threads()
    seen: dict[str, int] = {}
    inside = threading.Event()
    release = threading.Event()

    def forward_thread() -> None:
        with _one_thread(torch.device("cpu")):
            seen["inside"] = torch.get_num_threads()
            inside.set()
            release.wait(10)
        seen["after"] = torch.get_num_threads()

    t = threading.Thread(target=forward_thread)
    t.start()
    assert inside.wait(10)
    seen["other thread meanwhile"] = torch.get_num_threads()
    late = threading.Thread(target=lambda: seen.__setitem__("started meanwhile", torch.get_num_threads()))
    late.start()
    late.join()
    release.set()
    t.join()
    assert seen == {"inside": 1, "other thread meanwhile": before, "started meanwhile": before, "after": before}
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")  # spinning threads: two stay faster, nothing is changed
    with _one_thread(torch.device("cpu")):
        assert torch.get_num_threads() == before
    model = load_model("lesion")
    x = np.random.default_rng(1).random(model.spec.grid.shape, dtype=np.float32)
    one = predict_arrays(model, [x], batch_size=1, with_features=True)[0]
    two = predict_arrays(model, [x, x], batch_size=2, with_features=True)[0]  # two scans: the usual team
    assert np.allclose(one.logits, two.logits, rtol=0, atol=1e-5)



def test_the_one_thread_setting_reaches_torch_beside_another_openmp_runtime() -> None:
    # The serving process also loads scikit-learn, which bundles a libgomp of its own: the setting must go to the
    # runtime torch runs on, whatever order the two were loaded in.
    import os
    import subprocess
    import sys

    code = ("import threading, torch, sklearn.utils\n"
            "from neuroexplain.predict import _one_thread, _openmp\n"
            "seen = [torch.get_num_threads()]\n"
            "def run():\n"
            "    with _one_thread(torch.device('cpu')):\n"
            "        seen.append(torch.get_num_threads())\n"
            "t = threading.Thread(target=run); t.start(); t.join()\n"
            "print(_openmp() is not None, seen[1], seen[0], torch.get_num_threads())\n")
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True,
                         env=env)
    found, inside, before, after = out.stdout.split()
    if found == "False":
        pytest.skip("torch runs without an OpenMP runtime here")
    assert inside == "1" and after == before
