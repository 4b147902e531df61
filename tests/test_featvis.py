"""Feature visualization: tiny real models with known answers (no bundled weights needed)."""

from __future__ import annotations

import gzip
import io
import threading
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

from neuroexplain.errors import (
    CancelledError,
    InvalidOptionError,
    LimitExceededError,
    NotFoundError,
)
from neuroexplain.featvis import (
    OPTIONS,
    PRESETS,
    Preset,
    Progress,
    VisualizationCancelled,
    channel,
    describe_presets,
    parse_target,
    render_png,
    resolve,
    visualize,
)
from neuroexplain.featvis.objectives import LOGITS
from neuroexplain.models.registry import LoadedModel
from neuroexplain.models.spec import LayerInfo, ModelSpec
from neuroexplain.volumes import Grid, Scan, nifti_bytes

# An 8 mm grid over the same MNI box as the bundled models' (the template and brain mask resample onto it).
GRID = Grid((20, 24, 20), np.array([[8.0, 0, 0, -80], [0, 8.0, 0, -112], [0, 0, 8.0, -72], [0, 0, 0, 1]]))
TILE = 4


def _pattern() -> torch.Tensor:
    """A fixed 4x4x4 pattern with both signs: a bright bar along x on a dark background, plus a diagonal."""
    k = -0.5 * torch.ones(TILE, TILE, TILE)
    k[:, 1:3, 1:3] = 1.0
    k[torch.arange(TILE), torch.arange(TILE), torch.arange(TILE)] = 0.8
    return k


class Tiny(nn.Module):
    """``detect`` channel 0 fires for :func:`_pattern` (one 4^3 tile per output position), channel 1 for its
    negative; global max pooling and a linear head give two class logits."""

    def __init__(self) -> None:
        super().__init__()
        self.detect = nn.Sequential(nn.Conv3d(1, 2, TILE, stride=TILE), nn.ReLU())
        self.pool = nn.AdaptiveMaxPool3d(1)
        self.fc = nn.Linear(2, 2)
        with torch.no_grad():
            k = _pattern()
            self.detect[0].weight.copy_(torch.stack([k, -k])[:, None])
            self.detect[0].bias.fill_(8.0)  # both channels active on mid-grey noise (no dead ReLUs)
            self.fc.weight.copy_(torch.tensor([[-1.0, 1.0], [1.0, -1.0]]))
            self.fc.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.detect(x)), 1))


def _tiny_model() -> LoadedModel:
    module = Tiny().eval()
    for p in module.parameters():
        p.requires_grad_(False)
    spec = ModelSpec(
        name="tiny", version="1.0.0", task="test", classes=("plain", "pattern"), grid=GRID,
        architecture="tests.test_featvis:Tiny",
        layers=(LayerInfo("detect", 2, (5, 6, 5)),),
    )
    return LoadedModel(spec=spec, module=module, device=torch.device("cpu"))


@pytest.fixture(scope="module")
def model() -> LoadedModel:
    return _tiny_model()


def _tiles(volume: np.ndarray) -> np.ndarray:  # (n_tiles, 4, 4, 4)
    x, y, z = (s // TILE for s in volume.shape)
    v = volume[: x * TILE, : y * TILE, : z * TILE].reshape(x, TILE, y, TILE, z, TILE)
    return v.transpose(0, 2, 4, 1, 3, 5).reshape(-1, TILE, TILE, TILE)


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


# ---------------------------------------------------------------------------------------------------------------------
# Known answers


def test_channel_visualization_recovers_the_pattern_voxel_clamp(model: LoadedModel) -> None:
    result = visualize(model, "channel:detect:0", preset="none", steps=60, seed=1, options={"clamp": True})
    pattern = _pattern().numpy()
    tiles = _tiles(result.volume)
    # Under the clamp the optimum is range_max where the pattern is positive and range_min where it is negative.
    assert np.mean((tiles.mean(0) > 0.75) == (pattern > 0)) == 1.0
    assert min(_corr(t, pattern) for t in tiles) > 0.9
    optimum = 8.0 + 1.5 * float(_pattern().clamp(min=0).sum())  # bias + range_max * positive weights
    assert result.objective_final == pytest.approx(optimum, rel=1e-3)
    assert result.curve[0] < 0.3 * optimum


def test_channel_visualization_recovers_the_negative_pattern_fourier(model: LoadedModel) -> None:
    result = visualize(model, "channel:detect:1", preset="robust", steps=80, seed=2,
                       options={"l2": 1.0, "decay": 1.0, "cutoff": 0.5, "lr": 0.05, "jitter": 0, "scale": 0.0,
                                "rotate": 0.0, "pad": 0})
    # All frequencies free (robust's cutoff 0.25 cannot draw a 4-voxel period's sharp edges). The 1/f spectrum scaling learns this 4-voxel period more slowly than smooth content; the pattern is there.
    mean_tile = _tiles(result.volume).mean(0)
    assert _corr(mean_tile, -_pattern().numpy()) > 0.7
    bar = _pattern().numpy() == 1.0
    assert mean_tile[bar].max() < mean_tile[~bar].mean() - 0.3  # the detector's bright bar comes out dark


def test_class_objective_raises_the_logit(model: LoadedModel) -> None:
    result = visualize(model, "class:pattern", preset="paper", steps=20, seed=0)
    assert len(result.curve) == 20
    assert result.objective_final > result.curve[0]
    assert result.target == "class:pattern"


def test_same_seed_same_volume_other_seed_other_volume(model: LoadedModel) -> None:
    kw = {"preset": "full", "steps": 6, "options": {"rotate": 20.0, "jitter": 2, "scale": 0.2}}
    a = visualize(model, "class:pattern", seed=7, **kw)
    b = visualize(model, "class:pattern", seed=7, **kw)
    c = visualize(model, "class:pattern", seed=8, **kw)
    assert np.array_equal(a.volume, b.volume)
    assert a.curve == b.curve
    assert a.nifti == b.nifti
    assert not np.array_equal(a.volume, c.volume)


# ---------------------------------------------------------------------------------------------------------------------
# Progress, cancellation, hooks, the shared model


def _forward_counter(model: LoadedModel) -> tuple[list[int], torch.utils.hooks.RemovableHandle]:
    calls = [0]
    handle = model.module.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls, handle


def test_cancellation_stops_within_one_step(model: LoadedModel) -> None:
    seen: list[int] = []
    flag = threading.Event()

    def on_progress(p: Progress) -> None:
        seen.append(p.step)
        if p.step == 3:
            flag.set()  # the client went away during step 3

    calls, handle = _forward_counter(model)
    try:
        with pytest.raises(CancelledError) as info:
            visualize(model, "channel:detect:0", preset="robust", steps=50, progress=on_progress,
                      should_cancel=flag.is_set)
    finally:
        handle.remove()
    assert isinstance(info.value, VisualizationCancelled)
    assert info.value.step == 3 and seen == [1, 2, 3]
    assert calls[0] == 3  # no forward pass after the flag was raised
    assert "3 of 50" in str(info.value)


def test_cancel_before_the_first_step(model: LoadedModel) -> None:
    with pytest.raises(VisualizationCancelled) as info:
        visualize(model, "class:pattern", steps=10, should_cancel=lambda: True)
    assert info.value.step == 0


def _hook_count(module: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


def test_hooks_removed_after_success_cancel_and_error(model: LoadedModel) -> None:
    assert _hook_count(model.module) == 0
    visualize(model, "channel:detect:0", steps=2)
    assert _hook_count(model.module) == 0
    with pytest.raises(CancelledError):
        visualize(model, "channel:detect:0", steps=5, should_cancel=lambda: True)
    assert _hook_count(model.module) == 0

    def boom(_p: Progress) -> None:
        assert _hook_count(model.module) == 1  # the layer hook is installed while the optimisation runs
        raise RuntimeError("callback failed")

    with pytest.raises(RuntimeError, match="callback failed"):
        visualize(model, "channel:detect:0", steps=5, progress=boom)
    assert _hook_count(model.module) == 0


def test_shared_model_is_not_modified() -> None:
    m = _tiny_model()
    before = {k: v.clone() for k, v in m.module.state_dict().items()}
    visualize(m, "class:pattern", preset="full", steps=3, options={"batch": 2, "diversity": 1.0})
    assert not m.module.training
    assert all(not p.requires_grad for p in m.module.parameters())
    after = m.module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_concurrent_calls_on_one_model_do_not_see_each_other(model: LoadedModel) -> None:
    kw = {"preset": "none", "steps": 8, "seed": 3}
    expected = {c: visualize(model, f"channel:detect:{c}", **kw).volume for c in (0, 1)}
    got: dict[int, np.ndarray] = {}
    barrier = threading.Barrier(2)

    def work(c: int) -> None:
        barrier.wait()
        got[c] = visualize(model, f"channel:detect:{c}", **kw).volume

    threads = [threading.Thread(target=work, args=(c,)) for c in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(np.array_equal(got[c], expected[c]) for c in (0, 1))


def test_progress_reports_every_step_with_previews(model: LoadedModel) -> None:
    reports: list[Progress] = []
    result = visualize(model, "class:pattern", steps=5, progress=reports.append, preview_every=2)
    assert [p.step for p in reports] == [1, 2, 3, 4, 5]
    assert all(p.total == 5 for p in reports)
    assert [p.preview_png is not None for p in reports] == [False, True, False, True, True]
    assert reports[1].preview_png is not None and reports[1].preview_png.startswith(b"\x89PNG")
    assert [p.objective for p in reports] == result.curve


# ---------------------------------------------------------------------------------------------------------------------
# Outputs, starts, batches, objectives


def _decode(raw: bytes) -> nib.Nifti1Image:
    return nib.Nifti1Image.from_bytes(gzip.decompress(raw))


def test_outputs_are_on_the_model_grid(model: LoadedModel) -> None:
    result = visualize(model, "class:pattern", steps=2)
    image = _decode(result.nifti)
    assert image.shape == GRID.shape
    assert np.allclose(image.affine, GRID.affine)
    assert np.allclose(np.asarray(image.dataobj), result.volume)
    assert result.volume.dtype == np.float32 and result.volume.shape == GRID.shape
    assert result.png.startswith(b"\x89PNG")
    assert result.native_nifti is None


def test_scan_start_maps_back_onto_the_scan_grid(model: LoadedModel) -> None:
    from neuroexplain.template import anatomy

    # A coarser, left-right flipped (LAS) scan of the template: 10 mm voxels.
    t1 = anatomy(GRID).t1
    affine = np.array([[-10.0, 0, 0, 78], [0, 10.0, 0, -110], [0, 0, 10.0, -70], [0, 0, 0, 1]])
    data = np.ascontiguousarray(t1[::-1][::1, ::1][:16, :19, :16] * 700 + 1, dtype=np.float32)
    scan = Scan(data=data, affine=affine, digest="0" * 64, format="nifti1")
    result = visualize(model, "class:pattern", preset="paper", steps=3, start=scan)
    assert result.native_nifti is not None
    native = _decode(result.native_nifti)
    assert native.shape == scan.shape
    assert np.allclose(native.affine, affine)
    assert float(np.abs(np.asarray(native.dataobj)).max()) > 0


def test_template_start_and_brain_mask(model: LoadedModel) -> None:
    from neuroexplain.template import anatomy

    brain = anatomy(GRID).brain
    result = visualize(model, "class:pattern", preset="full", steps=3, start="template")
    assert np.all(result.volume[~brain] == 0)
    assert result.volume[brain].std() > 0
    untouched = visualize(model, "class:pattern", preset="none", steps=1, start="template", options={"lr": 1e-5})
    assert _corr(untouched.volume, anatomy(GRID).t1) > 0.99


def test_anchor_template_optimises_a_relative_change_of_the_template(model: LoadedModel) -> None:
    from neuroexplain.template import anatomy

    t1 = anatomy(GRID).t1
    # Template start: d = 0, so the volume starts as the template and stays 0 outside the brain.
    untouched = visualize(model, "class:pattern", preset="full", steps=1, start="template", options={"lr": 1e-5})
    assert np.allclose(untouched.volume, t1, atol=1e-3)
    result = visualize(model, "class:pattern", preset="full", steps=30, seed=0,
                       options={"range_map": "sigmoid", "range_min": -0.2, "range_max": 1.2})
    assert np.all(result.volume[t1 == 0] == 0)
    inside = t1 > 0.05
    d = result.volume[inside] / t1[inside] - 1  # the relative change is bounded by the range map
    assert d.min() >= -0.2 - 1e-4 and d.max() <= 1.2 + 1e-4 and d.std() > 0.01
    assert result.objective_final > result.curve[0]


def test_anchor_with_a_scan_start_changes_the_scan(model: LoadedModel) -> None:
    from neuroexplain.template import anatomy

    t1 = anatomy(GRID).t1
    affine = np.array([[-10.0, 0, 0, 78], [0, 10.0, 0, -110], [0, 0, 10.0, -70], [0, 0, 0, 1]])
    data = np.ascontiguousarray(t1[::-1][:16, :19, :16] * 700 + 1, dtype=np.float32)
    scan = Scan(data=data, affine=affine, digest="0" * 64, format="nifti1")
    untouched = visualize(model, "class:pattern", preset="full", steps=1, start=scan, options={"lr": 1e-5})
    plain = visualize(model, "class:pattern", preset="none", steps=1, start=scan, options={"lr": 1e-5})
    assert np.allclose(untouched.volume, plain.volume, atol=1e-3)  # d = 0: the scan on the model grid
    changed = visualize(model, "class:pattern", preset="full", steps=10, start=scan)
    assert np.all(changed.volume[plain.volume == 0] == 0)  # a relative change: 0 stays 0
    assert changed.native_nifti is not None and not np.allclose(changed.volume, plain.volume)


def test_prior_pulls_the_volume_towards_the_template(model: LoadedModel) -> None:
    from neuroexplain.template import anatomy

    t1 = anatomy(GRID).t1
    kw = {"preset": "none", "steps": 40, "seed": 0}
    free = visualize(model, "class:pattern", **kw)
    pulled = visualize(model, "class:pattern", **kw, options={"prior": 1000.0})
    assert np.abs(pulled.volume - t1).mean() < 0.5 * np.abs(free.volume - t1).mean()


def test_prior_measures_the_departure_relative_to_the_template() -> None:
    from neuroexplain.featvis.engine import relative_departure

    template = torch.tensor([0.0, 0.05, 0.3, 1.0])
    # the same brightening by 0.1 departs most where the template is dark; the floor (0.1) keeps the background finite
    expected = torch.tensor([1.0, 1.0, 1 / 3, 0.1])
    assert torch.allclose(relative_departure(template + 0.1, template), expected)


def test_batch_with_diversity_gives_distinct_samples(model: LoadedModel) -> None:
    result = visualize(model, "channel:detect:0", preset="none", steps=4, seed=5,
                       options={"batch": 3, "diversity": 1.0})
    assert result.samples.shape == (3, *GRID.shape)
    assert np.array_equal(result.samples[0], result.volume)
    assert not np.array_equal(result.samples[0], result.samples[1])
    assert _decode(result.nifti).shape == (*GRID.shape, 3)
    assert len(result.objective_finals) == 3


def test_objective_arithmetic(model: LoadedModel) -> None:
    x = torch.rand(2, 1, *GRID.shape)
    acts = {"detect": model.module.detect(x), LOGITS: model.module(x)}
    a, b = channel("detect", 0), channel("detect", 1)
    combined = a - 0.5 * b
    assert torch.allclose(combined(acts), a(acts) - 0.5 * b(acts))
    assert torch.allclose((-a)(acts), -a(acts))
    assert combined.layers == frozenset({"detect"})
    assert combined.description == "channel:detect:0 - 0.5*channel:detect:1"
    neuron = parse_target(model.spec, "neuron:detect:1:4:5:0")
    assert torch.allclose(neuron(acts), acts["detect"][:, 1, 4, 5, 0])
    assert torch.allclose(parse_target(model.spec, "class:pattern")(acts), acts[LOGITS][:, 1])
    assert torch.allclose(parse_target(model.spec, "layer:detect")(acts), acts["detect"].pow(2).flatten(1).mean(1))


def test_render_png_shape() -> None:
    from PIL import Image

    vol = np.zeros(GRID.shape, dtype=np.float32)
    vol[3, 4, 5] = 1.0
    image = Image.open(io.BytesIO(render_png(vol, zoom=1)))
    assert image.mode == "L"
    # Top row: sagittal (Y x Z), coronal (X x Z), axial (X x Y) side by side with 2-voxel gaps.
    assert image.width == 24 + 20 + 20 + 4
    assert image.height > 20


# ---------------------------------------------------------------------------------------------------------------------
# Bad input -> typed errors that name what is allowed


@pytest.mark.parametrize(
    ("target", "error", "allowed"),
    [
        ("class:tumour", InvalidOptionError, "['plain', 'pattern']"),
        ("channel:conv9:0", NotFoundError, "['detect']"),
        ("channel:detect:2", InvalidOptionError, "0 to 1"),
        ("channel:detect:-1", InvalidOptionError, "0 to 1"),
        ("channel:detect:x", InvalidOptionError, "not an integer"),
        ("neuron:detect:0:5:0:0", InvalidOptionError, "axis X allows 0 to 4"),
        ("neuron:detect:0:0:0", InvalidOptionError, "neuron:LAYER:C:X:Y:Z"),
        ("pixel:detect", InvalidOptionError, "class:CLASS"),
        ("", InvalidOptionError, "class:CLASS"),
    ],
)
def test_bad_targets(model: LoadedModel, target: str, error: type[Exception], allowed: str) -> None:
    with pytest.raises(error) as info:
        visualize(model, target, steps=1)
    assert type(info.value) is error
    assert allowed in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "error", "allowed"),
    [
        ({"steps": 0}, InvalidOptionError, "1 to 4096"),
        ({"steps": 4097}, LimitExceededError, "4096"),
        ({"seed": -1}, InvalidOptionError, "seed"),
        ({"preset": "lucid"}, InvalidOptionError, "['none', 'paper', 'robust', 'full', 'amplify']"),
        ({"start": "atlas"}, InvalidOptionError, "'noise', 'template'"),
        ({"options": {"lr": 50}}, InvalidOptionError, "1e-05 to 10"),
        ({"options": {"lr": "fast"}}, InvalidOptionError, "must be a number from"),
        ({"options": {"lr": "nan"}}, InvalidOptionError, "must be a number from 1e-05 to 10"),
        ({"options": {"batch": 9}}, InvalidOptionError, "1 to 8"),
        ({"options": {"batch": "1.5"}}, InvalidOptionError, "integer"),
        ({"options": {"param": "wavelet"}}, InvalidOptionError, "['voxel', 'fourier']"),
        ({"options": {"brain_mask": "maybe"}}, InvalidOptionError, "true or false"),
        ({"options": {"learning_rate": 0.1}}, InvalidOptionError, "options: ["),
        ({"options": {"range_min": 2.0}}, InvalidOptionError, "must be below range_max"),
        ({"preset": "paper", "options": {"decay": 2.0}}, InvalidOptionError, "param=fourier only"),
        ({"options": {"diversity": 1.0}}, InvalidOptionError, "batch to 2"),
        ({"options": {"diversity_layer": "conv1", "batch": 2}}, InvalidOptionError, "layers: ['detect']"),
        ({"options": {"blur_sigma": 1.0}}, InvalidOptionError, "blur_every"),
        ({"options": {"clamp": True, "range_map": "sigmoid"}}, InvalidOptionError, "choose one"),
        ({"options": {"anchor": "atlas"}}, InvalidOptionError, "['none', 'template']"),
        ({"options": {"prior": -1}}, InvalidOptionError, "0 to 10000"),
        ({"options": {"prior": "strong"}}, InvalidOptionError, "must be a number from 0 to 10000"),
        ({"preset": "none", "options": {"cutoff": 0.2}}, InvalidOptionError, "param=fourier only"),
        ({"options": {"anchor": "template", "range_map": "sigmoid"}}, InvalidOptionError,
         "range_min < 0 < range_max"),
    ],
)
def test_bad_arguments(model: LoadedModel, kwargs: dict, error: type[Exception], allowed: str) -> None:
    with pytest.raises(error) as info:
        visualize(model, "class:pattern", **{"steps": 1, **kwargs})
    assert type(info.value) is error
    assert allowed in str(info.value)


def test_every_option_is_documented_and_every_preset_resolves() -> None:
    for o in OPTIONS:
        assert o.doc and o.type in ("float", "int", "bool", "enum", "layer")
        if o.type in ("float", "int"):
            assert o.minimum is not None and o.maximum is not None and o.minimum <= o.default <= o.maximum
    assert set(PRESETS) == set(Preset)
    for p in Preset:
        s = resolve(p, None, ("detect",))
        assert {k: s[k] for k in PRESETS[p]} == dict(PRESETS[p])
    table = describe_presets()
    assert table["paper"]["lr"] == 0.05 and table["paper"]["weight_decay"] == 0.01 and table["paper"]["param"] == "voxel"
    assert table["robust"]["param"] == "fourier" and table["robust"]["rotate"] > 0
    # amplify is full with the decay the amplification protocol chose on its validation scans
    assert dict(PRESETS[Preset.AMPLIFY]) == {**PRESETS[Preset.FULL], "decay": 0.5}
    from neuroexplain.cli.commands.visualize import PRESETS as CLI_PRESETS

    assert set(CLI_PRESETS) == {p.value for p in Preset}  # the CLI's torch-free copy of the names


def test_string_option_values_are_parsed(model: LoadedModel) -> None:
    s = resolve("robust", {"lr": "0.02", "batch": "2", "brain_mask": "true", "jitter": 3.0}, ("detect",))
    assert (s["lr"], s["batch"], s["brain_mask"], s["jitter"]) == (0.02, 2, True, 3)


# ---------------------------------------------------------------------------------------------------------------------
# CLI


def _install_tiny_model(tmp_path: Path) -> Path:
    folder = tmp_path / "models" / "tiny"
    folder.mkdir(parents=True)
    m = _tiny_model()
    weights = folder / "weights.pt"
    torch.save(m.module.state_dict(), weights)
    import hashlib

    spec = ModelSpec(
        name="tinyfv", version="1.0.0", task="test", classes=m.spec.classes, grid=GRID,
        architecture="tiny.py:Tiny", layers=m.spec.layers,
        weights_sha256=hashlib.sha256(weights.read_bytes()).hexdigest(),
    )
    spec.save(folder / "spec.json")
    source = Path(__file__).read_text()
    (folder / "tiny.py").write_text(
        "import torch\nfrom torch import nn\nTILE = 4\n"
        + source[source.index("def _pattern"): source.index("def _tiny_model")]
    )
    return folder.parent


def test_cli_visualize_local(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from neuroexplain.cli.main import main

    monkeypatch.setenv("NEUROEXPLAIN_MODEL_DIRS", str(_install_tiny_model(tmp_path)))
    out, png, curve = tmp_path / "v.nii.gz", tmp_path / "v.png", tmp_path / "c.json"
    code = main(["visualize", "--model", "tinyfv", "--target", "channel:detect:0", "--preset", "paper",
                 "--steps", "3", "-o", str(out), "--png", str(png), "--curve", str(curve), "--local",
                 "--option", "lr=0.1"])
    assert code == 0
    assert np.allclose(_decode(out.read_bytes()).affine, GRID.affine)
    assert png.read_bytes().startswith(b"\x89PNG")
    import json

    saved = json.loads(curve.read_text())
    assert len(saved["curve"]) == 3 and saved["settings"]["lr"] == 0.1
    err = capsys.readouterr().err
    assert "research use only" in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--target", "class:nope"], "classes: ['plain', 'pattern']"),
        (["--target", "class:pattern", "--option", "lr"], "KEY=VALUE"),
        (["--target", "class:pattern", "--native-out", "n.nii.gz"], "--native-out needs --start SCAN"),
        (["--target", "class:pattern", "--steps", "5000"], "limit of 4096"),
        (["--target", "channel:conv9:0"], "layers: ['detect']"),
        (["--target", "class:pattern", "--option", "lr=99"], "1e-05 to 10"),
    ],
)
def test_cli_visualize_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                              argv: list[str], message: str) -> None:
    from neuroexplain.cli.main import main

    monkeypatch.setenv("NEUROEXPLAIN_MODEL_DIRS", str(_install_tiny_model(tmp_path)))
    code = main(["visualize", "--model", "tinyfv", "-o", str(tmp_path / "o.nii.gz"), "--local", *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert len(err) == 1 and message in err[0]


def test_cli_scan_start_writes_native_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from neuroexplain.cli.main import main
    from neuroexplain.template import anatomy

    monkeypatch.setenv("NEUROEXPLAIN_MODEL_DIRS", str(_install_tiny_model(tmp_path)))
    scan_affine = np.array([[9.0, 0, 0, -82], [0, 9.0, 0, -110], [0, 0, 9.0, -70], [0, 0, 0, 1]])
    scan_path = tmp_path / "scan.nii.gz"
    scan_path.write_bytes(nifti_bytes(anatomy(GRID).t1[:17, :21, :17] * 500 + 1, scan_affine))
    native = tmp_path / "n.nii.gz"
    code = main(["visualize", "--model", "tinyfv", "--target", "class:pattern", "--steps", "2", "--start",
                 str(scan_path), "-o", str(tmp_path / "o.nii.gz"), "--native-out", str(native), "--no-progress",
                 "--local"])
    assert code == 0
    image = _decode(native.read_bytes())
    assert image.shape == (17, 21, 17) and np.allclose(image.affine, scan_affine)


# ---------------------------------------------------------------------------------------------------------------------
# Band-limited Fourier parametrization and the transform bank


@pytest.mark.parametrize("cutoff", [0.5, 0.25, 0.1])
def test_band_limited_fourier_matches_zero_filled_irfftn_and_keeps_the_start(cutoff: float) -> None:
    from neuroexplain.featvis.param import Parametrization
    from neuroexplain.featvis.presets import Param, RangeMap

    start = torch.rand(2, 1, 12, 10, 9, generator=torch.Generator().manual_seed(0))
    p = Parametrization(Param.FOURIER, start, RangeMap.NONE, 0.0, 1.5, decay=1.0, cutoff=cutoff)
    assert torch.allclose(p.volume(), start, atol=1e-5)  # the start is reproduced exactly, whatever the band
    with torch.no_grad():
        p.raw.add_(torch.randn(p.raw.shape, generator=torch.Generator().manual_seed(1)))
        spectrum = torch.view_as_complex(p.raw) * p.scale
        full = torch.zeros(2, 1, 12, 10, 9 // 2 + 1, dtype=spectrum.dtype)
        full[(..., *p._index())] = spectrum
        expected = torch.fft.irfftn(full, s=(12, 10, 9), dim=(-3, -2, -1), norm="ortho")
        expected = expected + (p.residual if p.residual is not None else 0)
        assert torch.allclose(p.volume(), expected, atol=1e-5)
    fd = torch.fft.fftfreq(12).abs()
    assert p.raw.shape[2] == int((fd <= cutoff + 1e-9).sum())  # only the band is free


def test_cutoff_is_validated(model: LoadedModel) -> None:
    with pytest.raises(InvalidOptionError, match="param=fourier"):
        resolve("none", {"cutoff": 0.25}, ())
    with pytest.raises(InvalidOptionError, match="0.05 to 0.5"):
        resolve("robust", {"cutoff": 0.6}, ())
    assert resolve("robust", {}, ())["cutoff"] == 0.25


def test_transform_bank_jitter_is_an_exact_shift_with_zeros_moved_in() -> None:
    from neuroexplain.featvis.transforms import Robustness

    gen = torch.Generator().manual_seed(3)
    bank = Robustness(pad=1, jitter=2).bank((7, 8, 9), gen, size=6)
    v = torch.rand(1, 1, 7, 8, 9)
    for k in range(6):
        out = bank.apply(v, gen, choice=torch.tensor([k]))
        # find the shift that reproduces out from v (zeros where the source falls outside the box)
        found = False
        for sd in range(-2, 3):
            for sh in range(-2, 3):
                for sw in range(-2, 3):
                    ref = torch.zeros_like(v)
                    src = v[..., max(sd, 0): 7 + min(sd, 0), max(sh, 0): 8 + min(sh, 0), max(sw, 0): 9 + min(sw, 0)]
                    ref[..., max(-sd, 0): 7 + min(-sd, 0), max(-sh, 0): 8 + min(-sh, 0), max(-sw, 0): 9 + min(-sw, 0)] = src
                    found |= bool(torch.equal(out, ref))
        assert found


def test_transform_bank_rotation_moves_voxels_and_passes_gradients() -> None:
    from neuroexplain.featvis.transforms import Robustness

    gen = torch.Generator().manual_seed(4)
    bank = Robustness(pad=0, rotate=20.0, scale=0.1).bank((16, 16, 16), gen, size=4)
    v = torch.rand(2, 1, 16, 16, 16, requires_grad=True)
    out = bank.apply(v, gen)
    assert out.shape == v.shape and not torch.equal(out, v)
    out.sum().backward()
    assert v.grad is not None and float(v.grad.sum()) == pytest.approx(16**3 * 2)  # every output voxel has one source
