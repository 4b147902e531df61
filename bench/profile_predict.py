"""Predict stages of one 1 mm float32 scan in this process, each alone (p50 ms over 8 distinct scans), with the
resampling paths side by side (separable, 3D grid_sample, scipy) and read_scan's parts.

    flock /tmp/neuroexplain-bench.lock .venv/bin/python -m bench.profile_predict
"""
import gzip
import hashlib
import statistics
import time
import zlib

import numpy as np
import torch
from isal import isal_zlib

from bench.common import one_mm_scan_bytes
from neuroexplain import volumes
from neuroexplain.inputcheck import check_input
from neuroexplain.models import load_model
from neuroexplain.predict import predict_arrays, prepare
from neuroexplain.volumes import Alignment, read_scan

torch.set_num_threads(2)
model = load_model("lesion")
raw = one_mm_scan_bytes()
scans=[gzip.compress(gzip.decompress(raw), compresslevel=6, mtime=i) for i in range(8)]
def t(fn, n=8):
    ts=[]
    for s in scans[:n]:
        t0=time.perf_counter(); fn(s); ts.append(time.perf_counter()-t0)
    return round(statistics.median(ts)*1e3,1)
def inflate(s):
    d=isal_zlib.decompressobj(16+zlib.MAX_WBITS); d.decompress(s)
print("bytes", len(raw), "inflater", volumes.INFLATER)
print("inflate", t(inflate))
print("sha", t(lambda s: hashlib.sha256(s).hexdigest()))
print("read_scan", t(read_scan))
sc=read_scan(scans[0])
print("dtype", sc.data.dtype, sc.data.shape, sc.data.flags.f_contiguous)
print("prepare", t(lambda s: prepare(sc, model, Alignment.MNI)))
grid=model.spec.grid
from neuroexplain.template import anatomy

com=anatomy(grid).com_mm
pl=volumes.place(sc, grid, com, Alignment.MNI)
print("to_model", t(lambda s: pl.to_model(sc.data)))
r=pl.to_model(sc.data)
print("normalise", t(lambda s: volumes.normalise(r)))
p=prepare(sc, model, Alignment.MNI)
print("predict_arrays", t(lambda s: predict_arrays(model,[p.array],1,with_features=True)))
pr=predict_arrays(model,[p.array],1,with_features=True)[0]
print("check_input", t(lambda s: check_input(model,p,pr)))

m = np.linalg.inv(pl.scan_affine) @ np.linalg.inv(pl._scan_to_model_world()) @ grid.affine
print("to_model again", t(lambda s: pl.to_model(sc.data)))
print("scipy", t(lambda s: volumes._affine_resample(sc.data, m, grid.shape, 1)))
# read_scan parts: the inflate in the reader's pieces, and the finiteness check on a whole volume (the reader takes
# the extremes of each piece instead)
print("inflate in pieces", t(lambda s: sum(len(p) for _, p in volumes._Inflation(s).pieces(1 << 30, 0))))
print("finite, whole volume", t(lambda s: volumes._check_finite(sc.data, volumes.NonFinite.REJECT)))
print("grid_sample (the path for rotated placements)", t(lambda s: volumes.resample_torch(sc.data, m, grid.shape)))
print("prepare now", t(lambda s: prepare(sc, model, Alignment.MNI)))
