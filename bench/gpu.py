"""The GPU table (issue 21, item 5): one run on a CUDA machine, at most ~4 minutes, printed and saved as JSON.

Run it with ``bench/gpu.sh`` (it installs the carried wheels and sets ``PYTHONPATH``), from the source tree, on that
machine's own torch. Sections, each on the library and the in-process backend's runner:

1. predict per stage from the bytes of 1 mm ``.nii.gz`` scans (int16 and float32): inflate, ``read_scan``, host to
   device copy of the decoded volume, resample onto the model grid, normalise, forward, input check, and the whole
   predict from bytes (``Runner.predict``); ratio of the whole to inflate + host-to-device copy (target <= 1.3);
2. throughput at 1/4/16/64 concurrent clients, unbatched (each client calls ``Runner.predict``) and batched (a
   dynamic batcher hands ``Runner.predict_batch`` up to ``BATCH`` requests gathered within ``DELAY_MS``);
3. integrated gradients (defaults) against its floor (the same forward+backward passes at the same batch size) and
   feature visualization (``robust``) per step against one forward+backward pass of the same model;
4. AMP: forward (batch 1 and 16) and integrated gradients timed at float32, float16 and bfloat16 autocast, then the
   card's ``mixed_precision`` record (``neuroexplain.lab.evaluate_precision``, fewer scans than the CLI): the largest
   probability difference and each method's smallest Spearman correlation against float32;
5. peak GPU memory (``torch.cuda.max_memory_allocated``).

Without CUDA it refuses (exit code 2): CPU numbers are never reported as GPU numbers. ``--allow-cpu-dry-run`` runs
every section on the CPU with small sizes, to check that the script works end to end; then every line and the JSON
say ``CPU DRY RUN, NOT GPU FIGURES``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import statistics
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

DRY = "CPU DRY RUN, NOT GPU FIGURES"
MODEL = "lesion"
BATCH = 8
DELAY_MS = 5.0
OUT = Path(__file__).parent / "out"


class Bench:
    def __init__(self, device: str, dry: bool, budget_s: float) -> None:
        import torch

        self.torch = torch
        self.device = device
        self.dry = dry
        self.t0 = time.perf_counter()
        self.budget_s = budget_s
        self.peak_bytes = 0  # torch.cuda.max_memory_allocated() before a section reset it
        self.label = DRY if dry else f"GPU: {torch.cuda.get_device_name(0)}"
        self.result: dict[str, Any] = {"label": self.label, "device": device, "torch": torch.__version__,
                                       "cuda": torch.version.cuda, "python": platform.python_version(),
                                       "cpus": os.cpu_count(), "skipped": []}  # fmt: skip

    def say(self, text: str) -> None:
        print(f"[{self.label}] {text}", flush=True)

    def sync(self) -> None:
        if self.device.startswith("cuda"):
            self.torch.cuda.synchronize()

    def timed(self, fn: Callable[..., Any], *args: Any) -> tuple[Any, float]:
        self.sync()
        t0 = time.perf_counter()
        value = fn(*args)
        self.sync()
        return value, time.perf_counter() - t0

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.t0)

    def section(self, name: str, fn: Callable[[], Any], needs_s: float) -> None:
        if self.left() < needs_s:
            self.result["skipped"].append(name)
            self.say(f"{name}: skipped, {self.left():.0f} s of the time budget left")
            return
        t0 = time.perf_counter()
        self.result[name] = fn()
        self.say(f"{name}: done in {time.perf_counter() - t0:.1f} s")


def _ms(times: list[float]) -> float:
    return round(statistics.median(times) * 1e3, 2)


def _scans(count: int) -> dict[str, list[bytes]]:
    """``count`` distinct 1 mm scans per dtype (gzip level 1, compressed in parallel)."""
    import gzip

    import nibabel as nib
    import numpy as np

    from bench.common import one_mm_scan_bytes

    base = nib.Nifti1Image.from_bytes(gzip.decompress(one_mm_scan_bytes()))
    image = np.asarray(base.dataobj, dtype=np.float32)
    scale = 1000.0 / float(np.percentile(image[image > 0], 99))

    def one(job: tuple[str, int]) -> bytes:
        dtype, i = job
        factor = 1.0 + 1e-3 * i
        data = (np.round(image * scale * factor).astype(np.int16) if dtype == "int16"
                else (image * factor).astype(np.float32))  # fmt: skip
        img = nib.Nifti1Image(data, base.affine)
        img.header.set_data_dtype(data.dtype)
        img.header.set_slope_inter(1.0, 0.0)
        return gzip.compress(img.to_bytes(), compresslevel=1, mtime=0)

    jobs = [(d, i) for d in ("int16", "float32") for i in range(count)]
    with ThreadPoolExecutor(min(16, os.cpu_count() or 1)) as pool:
        blobs = list(pool.map(one, jobs))
    return {d: [b for (dd, _i), b in zip(jobs, blobs, strict=True) if dd == d] for d in ("int16", "float32")}


def _request(raw: bytes) -> Any:
    import hashlib

    from neuroexplain.serving.types import Alignment, PredictRequest, ScanInput

    return PredictRequest(MODEL, ScanInput(data=raw, digest=hashlib.sha256(raw).hexdigest(), alignment=Alignment.MNI))


def predict_stages(b: Bench, runner: Any, scans: dict[str, list[bytes]]) -> dict[str, Any]:
    import numpy as np

    from bench.common import inflaters
    from neuroexplain.inputcheck import check_input
    from neuroexplain.predict import ModelInput, predict_arrays
    from neuroexplain.template import anatomy
    from neuroexplain.volumes import Alignment, _inflater, normalise, place, read_scan, resample_torch

    torch = b.torch
    model = runner.model(MODEL)
    grid = model.spec.grid
    com = anatomy(grid).com_mm
    inflate = inflaters()
    out: dict[str, Any] = {"inflater": _inflater.__name__}
    for dtype, blobs in scans.items():
        t: dict[str, list[float]] = {k: [] for k in ("inflate", "inflate_pieces", "read_scan", "h2d",
                                                      "resample_on_device", "resample_library", "normalise",
                                                      "forward", "input_check", "whole_predict")}
        def h2d(data: np.ndarray) -> Any:  # (X, Y, Z) Fortran-ordered -> its C-ordered (Z, Y, X) view, on the device
            return torch.from_numpy(np.asfortranarray(data).T).to(b.device)

        def forward(array: np.ndarray) -> list[Any]:
            return predict_arrays(model, [array], 1, with_features=True)

        for i, raw in enumerate(blobs):
            got: dict[str, float] = {}
            got["inflate"] = b.timed(inflate["whole"], raw)[1]
            got["inflate_pieces"] = b.timed(inflate["pieces"], raw)[1]
            scan, got["read_scan"] = b.timed(read_scan, raw)
            vol, got["h2d"] = b.timed(h2d, scan.data)
            placement = place(scan, grid, com, Alignment.MNI)
            m = (np.linalg.inv(placement.scan_affine) @ np.linalg.inv(placement._scan_to_model_world())
                 @ grid.affine)  # fmt: skip
            got["resample_on_device"] = b.timed(resample_torch, vol.permute(2, 1, 0), m, grid.shape, b.device)[1]
            resampled, got["resample_library"] = b.timed(placement.to_model, scan.data)
            array, got["normalise"] = b.timed(normalise, resampled)
            (pred,), got["forward"] = b.timed(forward, array)
            got["input_check"] = b.timed(check_input, model, ModelInput(array=array, placement=placement), pred)[1]
            got["whole_predict"] = b.timed(runner.predict, _request(raw))[1]
            if i:  # the first scan warms up
                for k, v in got.items():
                    t[k].append(v)
        p50 = {k: _ms(v) for k, v in t.items()}
        floor = min(p50["inflate"], p50["inflate_pieces"]) + p50["h2d"]
        out[dtype] = {"p50_ms": p50, "floor_inflate_plus_h2d_ms": round(floor, 2),
                      "whole_over_floor": round(p50["whole_predict"] / floor, 2), "target": 1.3,
                      "n": len(t["inflate"])}  # fmt: skip
        b.say(f"predict {dtype}: " + ", ".join(f"{k} {v} ms" for k, v in p50.items())
              + f"; whole / (inflate + h2d) = {out[dtype]['whole_over_floor']} (target <= 1.3)")
    return out


def _batcher(runner: Any, stop: threading.Event, jobs: queue.Queue[Any]) -> None:
    """TorchServe-style dynamic batching: up to BATCH requests gathered within DELAY_MS, one predict_batch."""
    while not stop.is_set():
        try:
            first = jobs.get(timeout=0.05)
        except queue.Empty:
            continue
        batch = [first]
        deadline = time.perf_counter() + DELAY_MS / 1e3
        while len(batch) < BATCH:
            try:
                batch.append(jobs.get(timeout=max(0.0, deadline - time.perf_counter())))
            except queue.Empty:
                break
        answers = runner.predict_batch([req for req, _box, _ev in batch])
        for (_req, box, event), answer in zip(batch, answers, strict=True):
            box.append(answer)
            event.set()


def throughput(b: Bench, runner: Any, scans: dict[str, list[bytes]], clients: tuple[int, ...]) -> dict[str, Any]:
    pool_of = [r for blobs in scans.values() for r in blobs]
    requests = [_request(r) for r in pool_of]
    out: dict[str, Any] = {"batch": BATCH, "delay_ms": DELAY_MS}
    for mode in ("unbatched", "batched"):
        stop = threading.Event()
        jobs: queue.Queue[Any] = queue.Queue()
        worker = threading.Thread(target=_batcher, args=(runner, stop, jobs), daemon=True)
        if mode == "batched":
            worker.start()

        def call(i: int, mode: str = mode, jobs: queue.Queue[Any] = jobs) -> None:
            request = requests[i % len(requests)]
            if mode == "unbatched":
                runner.predict(request)
                return
            box: list[Any] = []
            event = threading.Event()
            jobs.put((request, box, event))
            event.wait()
            if isinstance(box[0], BaseException):
                raise box[0]

        rates: dict[str, float] = {}
        for c in clients:
            total = max(2 * c, 8 if b.dry else 32)
            with ThreadPoolExecutor(c) as pool:
                list(pool.map(call, range(c)))  # warm-up, one per client
                t0 = time.perf_counter()
                list(pool.map(call, range(total)))
                rates[str(c)] = round(total / (time.perf_counter() - t0), 2)
        stop.set()
        out[mode] = rates
        b.say(f"throughput {mode} (req/s at {'/'.join(map(str, clients))} clients): "
              + " / ".join(str(v) for v in rates.values()))
    return out


def ig_and_featvis(b: Bench, model: Any, steps: int) -> dict[str, Any]:
    from bench.bench_attribution import _floor, _floor_plan
    from neuroexplain.attribution import Method, batching, parse_options
    from neuroexplain.attribution.methods import attribute_tensor, private_copy
    from neuroexplain.featvis import visualize

    torch = b.torch
    x = torch.rand((1, 1, *model.spec.grid.shape), device=b.device)
    target = model.spec.class_index("lesion")
    layers = [layer.name for layer in model.spec.layers]
    out: dict[str, Any] = {}
    # internal_batch_size auto: on the device, what half its free memory holds (attribution.batching)
    free = batching.free_bytes(x.device)
    opts = batching.resolved(Method.INTEGRATED_GRADIENTS, parse_options(Method.INTEGRATED_GRADIENTS, None),
                             model.module, x)
    out["auto_batch"] = {"internal_batch_size": opts["internal_batch_size"], "free_bytes": free,
                         "volume_bytes_estimate": batching.volume_bytes(model.module, x, grad=True)}
    b.say(f"IG internal_batch_size auto: {opts['internal_batch_size']} (free {free} bytes, estimated "
          f"{out['auto_batch']['volume_bytes_estimate']} bytes per volume)")
    plan = _floor_plan(Method.INTEGRATED_GRADIENTS, opts, tuple(x.shape[2:]))
    floor_module = private_copy(model.module)
    floor = _floor(floor_module, x, plan, target, dict(floor_module.named_modules())[layers[-1]])

    def ig() -> None:
        attribute_tensor(private_copy(model.module, Method.INTEGRATED_GRADIENTS), x, Method.INTEGRATED_GRADIENTS,
                         target, opts, grid=model.spec.grid, layer_names=layers)

    ig()
    floor()
    tm, tf = [], []
    if not b.dry:  # the run's peak so far is kept; the IG rounds then get a peak of their own
        b.peak_bytes = max(b.peak_bytes, torch.cuda.max_memory_allocated())
        torch.cuda.reset_peak_memory_stats()
    for _ in range(3 if b.dry else 7):
        tm.append(b.timed(ig)[1])
        tf.append(b.timed(floor)[1])
    if not b.dry:  # what the auto batch really took, against the estimate it was chosen by
        out["auto_batch"]["peak_bytes_ig_and_floor"] = torch.cuda.max_memory_allocated()
    out["integrated_gradients"] = {"method_ms": _ms(tm), "floor_ms": _ms(tf), "ratio": round(_ms(tm) / _ms(tf), 3),
                                   "floor": [{"pass": k, "batch": n, "count": c} for k, n, c in plan],
                                   "target": 1.3}  # fmt: skip
    b.say(f"IG: {_ms(tm)} ms vs floor {_ms(tf)} ms, ratio {out['integrated_gradients']['ratio']} (target <= 1.3)")

    xf = torch.rand((1, 1, *model.spec.grid.shape), device=b.device, requires_grad=True)

    def forward_backward() -> None:
        xf.grad = None
        model.module(xf)[0, target].backward()

    stamps: list[float] = []
    fbs: list[float] = []

    def progress(_p: Any) -> None:
        b.sync()
        t = time.perf_counter()
        stamps.append(t)
        forward_backward()
        b.sync()
        fbs.append(time.perf_counter() - t)

    visualize(model, "class:lesion", preset="robust", steps=steps, seed=0, progress=progress)
    step_times = [stamps[i + 1] - stamps[i] - fbs[i] for i in range(len(stamps) - 1)]
    ratio = sum(step_times) / sum(fbs[1:])
    out["featvis_robust"] = {"step_ms": _ms(step_times), "forward_backward_ms": _ms(fbs[1:]), "ratio": round(ratio, 3),
                             "pairs": len(step_times), "target": 1.3}  # fmt: skip
    b.say(f"featvis robust: step {_ms(step_times)} ms vs forward+backward {_ms(fbs[1:])} ms, ratio {ratio:.2f} "
          "(target <= 1.3)")
    return out


def amp(b: Bench, model: Any) -> dict[str, Any]:
    """Forward at batch 1 and 16 and integrated gradients timed at float32, float16 and bfloat16 autocast (through
    the library's ``precision``), then the card's ``mixed_precision`` record as ``evaluate-precision`` measures it
    (fewer scans): what ``serve --precision`` on this card would need in the spec."""
    import numpy as np

    from neuroexplain.attribution import explain
    from neuroexplain.attribution.options import Method
    from neuroexplain.lab.evaluate_precision import measure
    from neuroexplain.lab.synthetic import Task
    from neuroexplain.precision import Precision, autocast

    torch = b.torch
    device_type = b.device.split(":")[0]
    out: dict[str, Any] = {}
    gen = torch.Generator().manual_seed(0)
    for batch in (1, 16):
        x = torch.rand((batch, 1, *model.spec.grid.shape), generator=gen).to(b.device)

        def run(precision: Precision, x: Any = x) -> None:
            with torch.inference_mode(), autocast(device_type, precision):
                model.module(x)

        t = {}
        for p in Precision:
            run(p)
            t[p.value] = _ms([b.timed(run, p)[1] for _ in range(5 if b.dry else 20)])
        out[f"forward_batch{batch}_ms"] = t
        b.say(f"AMP forward batch {batch}: " + ", ".join(f"{k} {v} ms" for k, v in t.items()))
    scan, placed = _lesion_input(model)
    times = {}
    for p in Precision:
        def ig(p: Precision = p) -> Any:
            return explain(model, scan, Method.INTEGRATED_GRADIENTS, prepared=placed, precision=p)

        ig()
        times[p.value] = round(b.timed(ig)[1] * 1e3, 1)
    out["integrated_gradients_ms"] = times
    b.say("AMP IG: " + ", ".join(f"{k} {v} ms" for k, v in times.items()))
    methods = (Method.GRADCAM, Method.INTEGRATED_GRADIENTS) if b.dry else tuple(Method)
    record = measure(model, Task.LESION, n_predict=2 if b.dry else 12, n_attribution=1 if b.dry else 2,
                     methods=methods, log=b.say)
    out["mixed_precision_record"] = {device_type: record}
    for p in ("float16", "bfloat16"):
        within = [m for m, rho in record[p]["methods"].items() if rho is not None and np.isfinite(rho) and rho >= 0.99]
        b.say(f"{p}: predict |dp| {record[p]['predict']:.5f} (target <= 1e-3); methods within Spearman 0.99: "
              f"{', '.join(within) or 'none'}")
    return out


def _lesion_input(model: Any) -> tuple[Any, Any]:
    from neuroexplain.lab.synthetic import HELD_OUT_SEED_START, Task, make_sample
    from neuroexplain.predict import prepare
    from neuroexplain.template import MNI_2MM
    from neuroexplain.volumes import Alignment, Scan

    sample = make_sample(Task.LESION, HELD_OUT_SEED_START + 1)
    scan = Scan(sample.image, MNI_2MM.affine.copy(), "", "nifti1")
    return scan, prepare(scan, model, Alignment.MNI)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/gpu.sh", description=__doc__.split("\n")[0])
    parser.add_argument("--allow-cpu-dry-run", action="store_true",
                        help=f"without CUDA, run every section on the CPU with small sizes, labelled {DRY!r}")
    parser.add_argument("--budget-s", type=float, default=float(os.environ.get("NEUROEXPLAIN_GPU_BUDGET_S", "220")),
                        help="time budget; sections that would not fit are skipped and listed (default 220 s)")
    parser.add_argument("--out", type=Path, default=None, help="JSON file (default bench/out/gpu.json, or "
                        "bench/out/gpu_cpu_dry_run.json for a dry run)")
    args = parser.parse_args(argv)
    import torch

    print(f"torch {torch.__version__} (CUDA build {torch.version.cuda}), python {platform.python_version()}, "
          f"{os.cpu_count()} CPUs", flush=True)
    if not torch.cuda.is_available():
        why = "this torch is a CPU build" if torch.version.cuda is None else "torch sees no CUDA device"
        if not args.allow_cpu_dry_run:
            print(f"bench/gpu.sh: {why}; refusing to report CPU numbers as GPU numbers (pass --allow-cpu-dry-run "
                  "to check the script on the CPU)", file=sys.stderr)
            return 2
        device, dry = "cpu", True
    else:
        device, dry = "cuda", False
        torch.backends.cudnn.benchmark = True
    b = Bench(device, dry, args.budget_s)
    if not dry:
        b.result["card"] = torch.cuda.get_device_name(0)
        torch.cuda.reset_peak_memory_stats()
    b.say(f"device {device}; model {MODEL}")
    from service.backends.inprocess import InProcessBackend

    backend = InProcessBackend(device=device, models=(MODEL,))
    backend.start()
    runner = backend._runner
    model = runner.model(MODEL)
    n = 3 if dry else 9
    t0 = time.perf_counter()
    scans = _scans(n)
    b.say(f"{n} scans per dtype made in {time.perf_counter() - t0:.1f} s")
    clients = (1, 4) if dry else (1, 4, 16, 64)
    b.section("predict", lambda: predict_stages(b, runner, scans), needs_s=20)
    b.section("throughput", lambda: throughput(b, runner, scans, clients), needs_s=40)
    b.section("attribution_featvis", lambda: ig_and_featvis(b, model, 5 if dry else 33), needs_s=20)
    b.section("amp", lambda: amp(b, model), needs_s=40)
    if not dry:
        b.result["peak_gpu_memory_mib"] = round(max(b.peak_bytes, torch.cuda.max_memory_allocated()) / 2**20, 1)
        b.say(f"peak GPU memory {b.result['peak_gpu_memory_mib']} MiB")
    b.result["seconds"] = round(time.perf_counter() - b.t0, 1)
    path = args.out or OUT / ("gpu_cpu_dry_run.json" if dry else "gpu.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(b.result, indent=2) + "\n")
    b.say(f"saved {path} ({b.result['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
