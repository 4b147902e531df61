"""Train the bundled models on synthetic data (``neuroexplain train --model lesion``).

Seeded end to end: the same arguments give the same weights on the same torch build. Training samples use seeds
``seed * 100_000 .. seed * 100_000 + n_train - 1``, which must stay below ``HELD_OUT_SEED_START``: every seed from
there on is reserved for held-out figures (test 1_000_000..., input-check calibration 2_000_000..., validation
3_000_000..., out-of-distribution 4_000_000...), and :func:`check_config` refuses a configuration that overlaps them.
The bundled weights are written only when asked for explicitly (``overwrite_bundled``).
"""

from __future__ import annotations

import datetime
import hashlib
import multiprocessing
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

import neuroexplain
from neuroexplain.errors import InvalidOptionError
from neuroexplain.lab.synthetic import CLASSES, HELD_OUT_SEED_START, Task, make_sample
from neuroexplain.models.registry import BUNDLED_DIR, describe_layers
from neuroexplain.models.spec import LayerInfo, ModelSpec
from neuroexplain.models.zoo import ScanCNN
from neuroexplain.template import MNI_2MM
from neuroexplain.volumes import normalise

LAYERS = ["conv1", "conv2", "conv3", "conv4"]
ARCHITECTURE_KWARGS = {
    Task.LESION: {"channels": [8, 16, 32, 64], "hidden": 0, "pool": "max", "stem_stride": 2},
    Task.ATROPHY: {"channels": [8, 16, 32, 64], "hidden": 0, "pool": "avg", "stem_stride": 2},
}


TRAIN_SEED_STRIDE = 100_000  # training seed s uses samples s * stride ...


@dataclass(frozen=True)
class TrainConfig:
    n_train: int = 600
    n_eval: int = 200
    epochs: int = 10
    batch_size: int = 8
    lr: float = 1e-3
    seed: int = 0
    version: str = "1.0.0"
    workers: int = 2
    # Blur half the training scans with a Gaussian of sigma ~ U(0, 1) voxel: what any resampling does to a scan
    # (registration, a non-integer centring shift), so that the model cannot read sharpness as a class.
    blur_augment: bool = False


def train_seed_range(config: TrainConfig) -> range:
    """The sample seeds a training run uses."""
    start = config.seed * TRAIN_SEED_STRIDE
    return range(start, start + config.n_train)


def check_config(config: TrainConfig) -> None:
    """Refuse a configuration whose training seeds overlap the reserved (validation, test, calibration) ranges.

    Raises:
        InvalidOptionError: a negative seed or sample count, or training seeds at or above ``HELD_OUT_SEED_START``.
    """
    if config.seed < 0 or config.n_train < 1 or config.n_eval < 1 or config.epochs < 1:
        raise InvalidOptionError("seed must be >= 0 and samples, eval and epochs at least 1")
    seeds = train_seed_range(config)
    if seeds.stop > HELD_OUT_SEED_START:
        top = (HELD_OUT_SEED_START - config.n_train) // TRAIN_SEED_STRIDE
        allowed = f"0..{top}" if top >= 0 else "none"
        raise InvalidOptionError(
            f"training seeds {seeds.start}..{seeds.stop - 1} overlap the seeds reserved for validation and test "
            f"(from {HELD_OUT_SEED_START} on); with {config.n_train} samples --seed must be in {allowed}",
            field="seed",
        )


def is_bundled(out_dir: Path) -> bool:
    """Whether ``out_dir`` is (inside) the package's bundled-model folder."""
    out, bundled = out_dir.resolve(), BUNDLED_DIR.resolve()
    return out == bundled or bundled in out.parents


def _generate(args: tuple[str, int]) -> tuple[np.ndarray, int]:
    task, seed = args
    sample = make_sample(Task(task), seed)
    return normalise(sample.image).astype(np.float16), sample.label


def _init_worker() -> None:
    torch.set_num_threads(1)


def generate(task: Task, seeds: range, workers: int, desc: str) -> tuple[np.ndarray, np.ndarray]:
    """Normalised samples (``(N, D, H, W)`` float16) and labels, generated in ``workers`` processes."""
    jobs = [(task.value, s) for s in seeds]
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(workers, initializer=_init_worker) as pool:
        results = list(tqdm(pool.imap(_generate, jobs, chunksize=4), total=len(jobs), desc=desc, unit="scan"))
    return np.stack([r[0] for r in results]), np.array([r[1] for r in results])


def evaluate(module: nn.Module, x: np.ndarray, y: np.ndarray, batch_size: int = 8) -> float:
    module.eval()
    correct = 0
    with torch.inference_mode():
        for i in range(0, len(x), batch_size):
            logits = module(torch.from_numpy(x[i : i + batch_size].astype(np.float32))[:, None])
            correct += int((logits.argmax(1).numpy() == y[i : i + batch_size]).sum())
    return correct / len(x)


def _random_blur(batch: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Each scan of ``(B, 1, D, H, W)`` blurred, with probability 1/2, by a separable Gaussian of sigma ~ U(0, 1)."""
    out = []
    for scan in batch:
        sigma = rng.uniform(0.0, 1.0) if rng.random() < 0.5 else 0.0
        if sigma < 0.05:
            out.append(scan)
            continue
        r = np.arange(-2, 3, dtype=np.float32)
        weights = np.exp(-0.5 * (r / sigma) ** 2)
        k = torch.from_numpy(weights / weights.sum())
        x = scan[None]
        for axis in range(3):
            shape = [1, 1, 1, 1, 1]
            shape[2 + axis] = 5
            pad = [0, 0, 0, 0, 0, 0]
            pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = 2
            x = nn.functional.conv3d(nn.functional.pad(x, pad, mode="replicate"), k.view(shape))
        out.append(x[0])
    return torch.stack(out)


def train(task: Task, out_dir: Path, config: TrainConfig = TrainConfig(), *, overwrite_bundled: bool = False
          ) -> ModelSpec:
    """Train one model and write ``spec.json`` and ``weights.pt`` into ``out_dir``.

    Raises:
        InvalidOptionError: the seeds overlap the reserved ranges (:func:`check_config`), or ``out_dir`` is the
            bundled models' folder and ``overwrite_bundled`` is False (checked before any work).
    """
    check_config(config)
    if is_bundled(out_dir) and not overwrite_bundled:
        raise InvalidOptionError(f"{out_dir} holds the bundled models; pass --overwrite-bundled to replace their "
                                 "weights, or choose another folder with -o", field="out")
    started = time.time()
    torch.manual_seed(config.seed)
    x, y = generate(task, train_seed_range(config), config.workers, "generate")
    module = ScanCNN(n_classes=2, **ARCHITECTURE_KWARGS[task])  # type: ignore[arg-type]
    optimiser = torch.optim.AdamW(module.parameters(), lr=config.lr, weight_decay=1e-4)
    steps = config.epochs * int(np.ceil(config.n_train / config.batch_size))
    # A short warm-up and a moderate peak: a 2e-3 peak collapsed the lesion model to a constant output.
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=config.lr, total_steps=steps, pct_start=0.1)
    rng = np.random.default_rng(config.seed)
    loss_fn = nn.CrossEntropyLoss()
    bar = tqdm(total=steps, desc=f"train {task.value}", unit="step")
    for _epoch in range(config.epochs):
        module.train()
        order = rng.permutation(config.n_train)
        for i in range(0, config.n_train, config.batch_size):
            idx = order[i : i + config.batch_size]
            batch = torch.from_numpy(x[idx].astype(np.float32))[:, None]  # (B, 1, D, H, W)
            flip = torch.from_numpy(rng.random(len(idx)) < 0.5)
            batch = torch.where(flip[:, None, None, None, None], batch.flip(2), batch)  # left-right flip
            if config.blur_augment:
                batch = _random_blur(batch, rng)
            loss = loss_fn(module(batch), torch.from_numpy(y[idx]).long())
            optimiser.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(module.parameters(), 1.0)
            optimiser.step()
            schedule.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    del x, y
    held_out = range(HELD_OUT_SEED_START, HELD_OUT_SEED_START + config.n_eval)
    xe, ye = generate(task, held_out, config.workers, "held-out")
    accuracy = evaluate(module, xe, ye)
    module.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = out_dir / "weights.pt"
    torch.save(module.state_dict(), weights)
    layers = tuple(LayerInfo(n, c, s) for n, c, s in describe_layers(module, MNI_2MM.shape, LAYERS))
    spec = ModelSpec(
        name=task.value,
        version=config.version,
        task=f"{task.value} classification on synthetic MRI (MNI152 2 mm)",
        classes=CLASSES[task],
        grid=MNI_2MM,
        architecture="neuroexplain.models.zoo:ScanCNN",
        architecture_kwargs={"n_classes": 2, **ARCHITECTURE_KWARGS[task]},
        layers=layers,
        weights_sha256=hashlib.sha256(weights.read_bytes()).hexdigest(),
        training={
            "command": f"neuroexplain train --model {task.value} --samples {config.n_train} --epochs {config.epochs} --seed {config.seed}"
                       + (" --blur-augment" if config.blur_augment else ""),
            "train_seeds": [config.seed * 100_000, config.seed * 100_000 + config.n_train - 1],
            "epochs": config.epochs,
            "batch_size": config.batch_size,
            "lr": config.lr,
            "optimiser": "AdamW(weight_decay=1e-4) + OneCycleLR(pct_start=0.1), grad-norm clip 1.0",
            "augmentation": "left-right flip" + (", Gaussian blur sigma U(0, 1) voxel on half the scans"
                                                 if config.blur_augment else ""),
            "seconds": round(time.time() - started, 1),
            "date": datetime.date.today().isoformat(),
            "neuroexplain": neuroexplain.__version__,
            "torch": torch.__version__,
            "machine": platform.machine(),
        },
        metrics={
            "held_out_accuracy": accuracy,
            "held_out_n": config.n_eval,
            "held_out_seeds": [held_out.start, held_out.stop - 1],
        },
    )
    spec.save(out_dir / "spec.json")
    return spec
