# ruff: noqa: B023, BLE001  (the lambdas run inside their loop iteration; a failing path is recorded, not raised)
"""Conv3d paths at batch 1 for the bundled models (README -> Benchmarks, "Conv3d at batch 1"): PyTorch's default
(slow_conv3d at batch 1), channels-last 3D, oneDNN called directly (what predict runs), a batch of 2 (where the
dispatcher picks oneDNN itself) and torch.utils.mkldnn. p50 ms of 21 calls after 3 warm-ups, two interleaved rounds.

    flock /tmp/neuroexplain-bench.lock .venv/bin/python -m bench.conv3d_paths
"""
import copy
import os
import statistics
import time
from typing import Any

import torch
import torch.utils.mkldnn

from neuroexplain.models import load_model
from neuroexplain.predict import inference_module

torch.set_num_threads(2)
print("load", os.getloadavg())
def med(fn, n=21):
    for _ in range(3): fn()
    ts=[]
    for _ in range(n):
        t0=time.perf_counter(); fn(); ts.append(time.perf_counter()-t0)
    return round(statistics.median(ts)*1e3,2)
for name in ("lesion","atrophy"):
    m=load_model(name); mod=m.module
    x=torch.randn(1,1,*m.spec.grid.shape)
    fast=inference_module(m)
    with torch.inference_mode():
        ref=mod(x)
        cl=copy.deepcopy(mod).to(memory_format=torch.channels_last_3d)  # type: ignore[call-overload]
        xcl=x.contiguous(memory_format=torch.channels_last_3d)
        mk=torch.utils.mkldnn.to_mkldnn(copy.deepcopy(mod))
        out: dict[str, Any] = {}
        for rnd in range(2):  # interleave twice
            for k,f in (("slow_conv3d_default",lambda: mod(x)),("channels_last_3d",lambda: cl(xcl)),
                        ("onednn_direct",lambda: fast(x)),("batch2_total_onednn",lambda: mod(torch.cat([x,x])))):
                out.setdefault(k,[]).append(med(f))
        try:
            xm=x.to_mkldnn()
            out["to_mkldnn"]=[med(lambda: mk(xm))]
        except Exception as e:
            out["to_mkldnn"]=repr(e)[:120]
        out["diff_channels_last"]=(cl(xcl)-ref).abs().max().item()
        out["diff_onednn_direct"]=(fast(x)-ref).abs().max().item()
    print(name, tuple(m.spec.grid.shape), out, flush=True)
