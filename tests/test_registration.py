"""alignment=register: affine registration to the template (SimpleITK), its composition with the grid mapping, and
every refusal. Known answers come from moving the template itself by a chosen affine onto a native grid."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial.transform import Rotation

pytest.importorskip("SimpleITK")

from neuroexplain.errors import InvalidOptionError, ScanDataError, status_name
from neuroexplain.registration import (
    RegistrationError,
    RegistrationSettings,
    dilated_brain,
    in_model_space,
    register,
)
from neuroexplain.template import MNI_2MM, anatomy
from neuroexplain.volumes import Alignment, Scan, _affine_resample, place


def _world_move(rot_deg: tuple[float, float, float], shift: tuple[float, float, float],
                scale: tuple[float, float, float]) -> np.ndarray:
    """W: model world -> scanner world, rotating and scaling about the template's centre of mass."""
    c = anatomy(MNI_2MM).com_mm
    a = Rotation.from_euler("xyz", rot_deg, degrees=True).as_matrix() @ np.diag(scale)
    w = np.eye(4)
    w[:3, :3] = a
    w[:3, 3] = c - a @ c + np.asarray(shift)
    return w


def _native(image: np.ndarray, w: np.ndarray, mm: float = 1.5, extent: tuple[float, float, float] = (200, 230, 200),
            oblique_deg: float = 0.0) -> Scan:
    """``image`` (on MNI_2MM) seen by a scanner whose world is ``w`` (model world), on its own ``mm`` grid."""
    shape = tuple(round(e / mm) for e in extent)
    grid_rot = Rotation.from_euler("z", oblique_deg, degrees=True).as_matrix()
    affine = np.eye(4)
    affine[:3, :3] = grid_rot * mm
    centre = (w @ np.append(anatomy(MNI_2MM).com_mm, 1.0))[:3]
    affine[:3, 3] = centre - affine[:3, :3] @ (np.asarray(shape) / 2)
    m = np.linalg.inv(MNI_2MM.affine) @ np.linalg.inv(w) @ affine
    data = _affine_resample(image, m, shape, 1)  # type: ignore[arg-type]
    return Scan(data=data * 800.0, affine=affine, digest="0" * 64, format="nifti1")


def _rms_mm(transform: np.ndarray, expected: np.ndarray) -> float:
    """RMS distance over the template's brain between two scan->model world transforms."""
    idx = np.argwhere(anatomy(MNI_2MM).brain)[::40]
    p = MNI_2MM.affine @ np.c_[idx, np.ones(len(idx))].T
    q = transform @ np.linalg.inv(expected) @ p
    return float(np.sqrt(((q - p)[:3] ** 2).sum(0).mean()))


W = _world_move((12.0, -9.0, 14.0), (18.0, -15.0, 12.0), (1.07, 0.93, 1.05))  # inside 15 deg, 25 mm, +-8 %


@pytest.fixture(scope="module")
def moved() -> Scan:
    return _native(anatomy(MNI_2MM).t1, W, oblique_deg=20.0)


@pytest.fixture(scope="module")
def registered(moved: Scan):  # type: ignore[no-untyped-def]
    return place(moved, MNI_2MM, anatomy(MNI_2MM).com_mm, Alignment.AUTO)


def test_auto_registers_a_moved_scan_and_recovers_the_affine(moved: Scan, registered) -> None:  # type: ignore[no-untyped-def]
    assert not in_model_space(moved, MNI_2MM)
    assert registered.alignment is Alignment.REGISTER
    r = registered.registration
    # the scan's world is W(model world): the registration must find inv(W)
    assert _rms_mm(r.transform, np.linalg.inv(W)) < 1.0
    assert r.correlation > 0.95 and r.coverage > 0.95
    assert np.isfinite(r.metric) and r.metric < 0 and r.seconds > 0
    model_input = registered.to_model(moved.data)
    t1 = anatomy(MNI_2MM).t1
    assert np.corrcoef(model_input.ravel(), t1.ravel())[0, 1] > 0.95


def test_a_scan_already_in_model_space_is_taken_as_mni() -> None:
    scan = Scan(data=anatomy(MNI_2MM).t1 * 500.0, affine=MNI_2MM.affine, digest="0" * 64, format="nifti1")
    placement = place(scan, MNI_2MM, anatomy(MNI_2MM).com_mm, Alignment.AUTO)
    assert placement.alignment is Alignment.MNI and placement.registration is None


def test_maps_go_back_exactly_onto_the_scan_grid(moved: Scan, registered) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(0)
    model_map = ndimage.gaussian_filter(rng.normal(size=MNI_2MM.shape), 2).astype(np.float32)
    native = registered.to_native(model_map)
    assert native.shape == moved.shape
    # direct inverse mapping, computed independently: scan voxel -> scan world -> model world -> model voxel
    idx = np.indices(moved.shape).reshape(3, -1)[:, ::997]
    world = moved.affine @ np.r_[idx, np.ones((1, idx.shape[1]))]
    model_vox = np.linalg.inv(MNI_2MM.affine) @ registered.registration.transform @ world
    direct = ndimage.map_coordinates(model_map, model_vox[:3], order=1, mode="constant", cval=0.0)
    np.testing.assert_allclose(native.reshape(-1)[::997], direct, atol=1e-5)
    # world_to_native is the same inverse
    vox = np.argwhere(anatomy(MNI_2MM).brain)[::5000].T
    pts = (MNI_2MM.affine @ np.r_[vox, np.ones((1, vox.shape[1]))])[:3].T
    back = registered.world_to_native(pts)
    fwd = (registered.registration.transform @ np.c_[back, np.ones(len(back))].T)[:3].T
    np.testing.assert_allclose(fwd, pts, atol=1e-6)


def test_registration_is_deterministic(moved: Scan, registered) -> None:  # type: ignore[no-untyped-def]
    again = register(moved, MNI_2MM)
    np.testing.assert_array_equal(again.transform, registered.registration.transform)
    assert again.metric == registered.registration.metric


def test_a_skull_is_removed_after_registration() -> None:
    a = anatomy(MNI_2MM)
    dist = ndimage.distance_transform_edt(~a.brain, sampling=MNI_2MM.zooms)
    head = a.t1 + 0.9 * ((dist > 9) & (dist < 15))  # bright skull/scalp shell 9-15 mm outside the brain
    scan = _native(head.astype(np.float32), W)
    placement = place(scan, MNI_2MM, a.com_mm, Alignment.REGISTER)
    assert _rms_mm(placement.registration.transform, np.linalg.inv(W)) < 2.0
    model_input = placement.to_model(scan.data)
    assert not np.any(model_input[~dilated_brain(MNI_2MM)])


def test_unknown_alignment_name_is_refused() -> None:
    with pytest.raises(InvalidOptionError, match="'affine' is unknown; expected one of .*'register'"):
        Alignment.parse("affine")
    scan = Scan(data=anatomy(MNI_2MM).t1, affine=MNI_2MM.affine, digest="0" * 64, format="nifti1")
    with pytest.raises(InvalidOptionError, match="unknown"):
        place(scan, MNI_2MM, anatomy(MNI_2MM).com_mm, "register")  # type: ignore[arg-type]


def test_a_slab_cannot_be_registered() -> None:
    t1 = anatomy(MNI_2MM).t1.copy()
    t1[:, :, :45] = 0
    t1[:, :, 52:] = 0  # a 14 mm axial slab
    scan = _native(t1, W)
    with pytest.raises(RegistrationError, match="covers only|diverged|did not converge"):
        register(scan, MNI_2MM)


def test_a_thin_volume_is_refused_before_registering() -> None:
    scan = Scan(data=np.ones((100, 100, 2), np.float32), affine=np.diag([2.0, 2.0, 2.0, 1.0]), digest="0" * 64,
                format="nifti1")
    with pytest.raises(RegistrationError, match="thin along one axis"):
        register(scan, MNI_2MM)


def test_no_signal_in_the_templates_field_of_view_is_refused() -> None:
    blank = Scan(data=np.zeros((60, 60, 60), np.float32), affine=np.diag([3.0, 3.0, 3.0, 1.0]), digest="0" * 64,
                 format="nifti1")
    with pytest.raises(ScanDataError, match="no positive intensities"):
        register(blank, MNI_2MM)
    blob = np.zeros((60, 60, 60), np.float32)
    blob[5:12, 5:12, 5:12] = 1.0  # a small bright cube: nothing that could cover the template's brain
    # (its signal is moved onto the template by the centre-of-mass start, then covers ~1 % of the brain)
    with pytest.raises(RegistrationError, match="covers only [0-9]+% of the template's brain"):
        register(Scan(data=blob, affine=np.diag([3.0, 3.0, 3.0, 1.0]), digest="0" * 64, format="nifti1"), MNI_2MM)


def test_a_scan_without_anatomy_does_not_converge_and_is_refused() -> None:
    # Signal everywhere, structure nowhere: the optimiser ends somewhere, and the result check refuses it.
    noise = np.random.default_rng(0).random((60, 60, 60)).astype(np.float32)
    with pytest.raises(RegistrationError, match="did not converge: the result correlates"):
        register(Scan(data=noise, affine=np.diag([3.0, 3.0, 3.0, 1.0]), digest="0" * 64, format="nifti1"), MNI_2MM)


def test_registration_refusals_are_invalid_argument() -> None:
    assert issubclass(RegistrationError, ScanDataError)
    assert status_name(RegistrationError("x")) == "INVALID_ARGUMENT"


def test_cli_refuses_a_slab_with_one_clear_error_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import nibabel as nib

    from neuroexplain.cli.main import main

    t1 = anatomy(MNI_2MM).t1.copy()
    t1[:, :, :45] = 0
    t1[:, :, 52:] = 0
    slab = _native(t1, W, mm=2.0)
    path = tmp_path / "slab.nii.gz"
    nib.save(nib.Nifti1Image(slab.data, slab.affine), str(path))
    # auto (the default) registers it, since it is not in the model's space, and refuses the result
    assert main(["predict", "--model", "lesion", "--local", str(path)]) != 0
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and "covers only" in errors[0] and "a slab" in errors[0]
    assert "Traceback" not in err


def test_settings_are_checked_by_the_result() -> None:
    strict = RegistrationSettings(min_correlation=0.999)
    scan = _native(anatomy(MNI_2MM).t1, W, mm=2.0)
    with pytest.raises(RegistrationError, match="correlates"):
        register(scan, MNI_2MM, strict)
