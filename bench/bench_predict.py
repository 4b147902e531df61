"""Predict latency per stage for a 1 mm scan, and the whole pipeline against the forward pass alone.

Stages: decode (gunzip + nibabel parse + float32 conversion), validate (header, shape, affine and finite checks),
resample (onto the 2 mm model grid), normalise, forward. Aim: everything around the forward pass costs no more than
the forward pass itself (whole / forward <= 2).
"""

from __future__ import annotations

import numpy as np
import torch

from bench.common import one_mm_scan_bytes, p50, peak_rss_mb, save, timeit
from neuroexplain import volumes
from neuroexplain.models import load_model
from neuroexplain.predict import predict, prepare
from neuroexplain.template import anatomy
from neuroexplain.volumes import normalise, place, read_scan


def main() -> None:
    torch.set_num_threads(2)
    model = load_model("lesion")
    raw = one_mm_scan_bytes()
    scan = read_scan(raw)
    com = anatomy(model.spec.grid).com_mm
    placement = place(scan, model.spec.grid, com)
    resampled = placement.to_model(scan.data)
    x = torch.from_numpy(normalise(resampled))[None, None]

    def decode() -> None:
        body = volumes._gunzip(raw, 1 << 30, allow_short=False, declared=None)
        image = volumes._nibabel_image("nifti1", body)
        volumes._select_volume(image, scan.shape, None)

    def validate() -> None:
        head = volumes._gunzip(raw, volumes._HEAD_BYTES, allow_short=True)
        _kind, shape, _dtype, _offset = volumes._parse_header(head)
        volumes._check_shape(shape, None, volumes.ScanLimits())
        volumes._check_affine(scan.affine)
        volumes._check_finite(scan.data, volumes.NonFinite.REJECT)

    def forward() -> None:
        with torch.inference_mode():
            model.module(x)

    stages = {
        "decode": timeit(decode),
        "validate": timeit(validate),
        "resample": timeit(lambda: place(scan, model.spec.grid, com).to_model(scan.data)),
        "normalise": timeit(lambda: normalise(resampled)),
        "forward": timeit(forward),
    }
    whole = timeit(lambda: predict(model, [read_scan(raw)]))
    prepare_only = timeit(lambda: prepare(read_scan(raw), model))
    result = {
        "scan": {"shape": list(scan.shape), "voxel_mm": list(scan.zooms), "gz_bytes": len(raw)},
        "p50_seconds": {k: round(p50(v), 4) for k, v in stages.items()},
        "whole_p50_seconds": round(p50(whole), 4),
        "around_forward_p50_seconds": round(p50(prepare_only), 4),
        "ratio_whole_to_forward": round(p50(whole) / p50(stages["forward"]), 2),
        "ratio_around_to_forward": round(p50(prepare_only) / p50(stages["forward"]), 2),
        "target": "around_forward <= forward (ratio_around_to_forward <= 1.0)",
        "peak_rss_mb": round(peak_rss_mb()),
        "torch_threads": torch.get_num_threads(),
        "stage_sum_check": round(float(np.sum([p50(v) for v in stages.values()])), 4),
    }
    save("predict", result)


if __name__ == "__main__":
    main()
