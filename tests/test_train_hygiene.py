"""Training hygiene: seeds never overlap the reserved ranges, the bundled weights are never overwritten by accident,
and the command says where the model went. Every refusal happens before any scan is generated."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from neuroexplain.cli.main import main
from neuroexplain.errors import InvalidOptionError
from neuroexplain.lab.synthetic import HELD_OUT_SEED_START, Task
from neuroexplain.lab.train import TrainConfig, check_config, is_bundled, train, train_seed_range
from neuroexplain.models.registry import BUNDLED_DIR


def test_training_seeds_below_the_reserved_ranges_are_accepted() -> None:
    config = TrainConfig(n_train=600, seed=9)
    check_config(config)
    assert train_seed_range(config).stop <= HELD_OUT_SEED_START


@pytest.mark.parametrize("seed,n_train", [(10, 600), (9, 100_001), (-1, 600)])
def test_seeds_overlapping_validation_or_test_are_refused(seed: int, n_train: int) -> None:
    with pytest.raises(InvalidOptionError, match="overlap the seeds reserved|seed must be >= 0"):
        check_config(TrainConfig(n_train=n_train, seed=seed))


def test_the_bundled_folder_is_never_overwritten_unless_asked(tmp_path: Path) -> None:
    weights = BUNDLED_DIR / "lesion" / "weights.pt"
    before = hashlib.sha256(weights.read_bytes()).hexdigest()
    assert is_bundled(BUNDLED_DIR / "lesion") and not is_bundled(tmp_path)
    with pytest.raises(InvalidOptionError, match="--overwrite-bundled"):
        train(Task.LESION, BUNDLED_DIR / "lesion", TrainConfig(n_train=8, n_eval=1, epochs=1))
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == before


def test_cli_refuses_overlap_and_bundled_and_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--model", "lesion", "--seed", "10"]) != 0
    assert "overlap the seeds reserved" in capsys.readouterr().err
    assert main(["train", "--model", "lesion", "-o", str(BUNDLED_DIR / "lesion")]) != 0
    assert "--overwrite-bundled" in capsys.readouterr().err


def test_cli_prints_where_the_model_was_written(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "m"
    assert main(["train", "--model", "lesion", "--samples", "8", "--epochs", "1", "--eval", "1", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"will be written to {out.resolve()}" in printed
    assert str((out / "weights.pt").resolve()) in printed and (out / "weights.pt").is_file()
    assert (out / "spec.json").is_file()


def test_blur_augmentation_smooths_about_half_the_scans() -> None:
    """``--blur-augment``: a Gaussian (sigma up to 1 voxel) on about half the batch, never a change of size or mean."""
    import numpy as np
    import torch

    from neuroexplain.lab.train import _random_blur

    x = torch.rand(64, 1, 12, 14, 16)
    y = _random_blur(x, np.random.default_rng(0))
    assert y.shape == x.shape
    changed = [i for i in range(len(x)) if float((y[i] - x[i]).abs().max()) > 1e-6]
    assert 0.3 * len(x) < len(changed) < 0.7 * len(x)

    def roughness(v: torch.Tensor) -> float:
        return float((v[..., 1:] - v[..., :-1]).pow(2).mean())

    for i in changed:  # sigma is drawn from U(0, 1): some blurs are slight, none sharpens
        assert roughness(y[i]) < roughness(x[i])
        assert abs(float(y[i].mean() - x[i].mean())) < 0.02
    assert sum(roughness(y[i]) < 0.7 * roughness(x[i]) for i in changed) > len(changed) / 2
