"""PACS bridge under load: 20 series of 1 mm sent at once; all results stored, none lost or duplicated.

Real processes only: a gateway (``neuroexplain serve --backend inprocess``, the bundled ``lesion`` model, result cache
off), the bridge (``python -m neuroexplain.pacs``, default ``--quiet-seconds 10``, Predict and, with
``NEUROEXPLAIN_BENCH_PACS_METHOD``, that method's Attribute), Debian's Orthanc as the destination, and one dcmtk
``storescu`` per series, all started at the same moment (20 modalities sending at once). Before the sends, one
more series (not counted) goes through the bridge's own gRPC code to warm the gateway (model load, first call).

Each series is a different synthetic lesion scan (its own seed) upsampled to 1 mm (``bench.common.one_mm_scan_bytes``:
160 x 192 x 160 voxels), written as 160 axial single-frame MR images of 192 rows x 160 columns, int16 with a rescale
slope of 0.05, uncompressed (about 10 MB a series).

Measured:
- series per minute: series / (seconds from the start of the sends to the last series' results stored in Orthanc);
- seconds from a series' last instance (``last`` in its ``state.json``: the time the bridge fsynced it) to its
  results stored (the moment Orthanc first lists the series' last result object, polled every 0.25 s), p50 and p95;
- all results stored: every series' study holds exactly its expected result objects in Orthanc (one SR from Predict,
  plus a Parametric Map and an SR per method), distinct SOP Instance UIDs, no other instance, nothing in ``failed/``;
- the bridge's peak RSS (VmHWM of its process) and the gateway's.

``NEUROEXPLAIN_BENCH_PACS_SERIES`` changes the number of series (default 20). Results go to ``bench/out/pacs.json``
(``pacs-METHOD.json`` with a method), the bridge's log beside it.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench.common import OUT, one_mm_scan_bytes, p95, save

SERIES = int(os.environ.get("NEUROEXPLAIN_BENCH_PACS_SERIES", "20"))
METHOD = os.environ.get("NEUROEXPLAIN_BENCH_PACS_METHOD", "")
MODEL = "lesion"
QUIET_SECONDS = 10.0  # the bridge's default
NAME = f"pacs-{METHOD}" if METHOD else "pacs"  # bench/out/NAME.json


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _hwm_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise SystemExit(f"bench pacs needs {name} on PATH")
    return path


class Orthanc:
    """Debian's Orthanc on free loopback ports, its own storage (the destination of the results)."""

    def __init__(self, folder: Path) -> None:
        self.dicom_port, self.http_port = _free_port(), _free_port()
        (folder / "storage").mkdir(parents=True)
        config = {
            "Name": "neuroexplain-bench", "StorageDirectory": str(folder / "storage"),
            "IndexDirectory": str(folder / "storage"), "DicomAet": "ORTHANC", "DicomPort": self.dicom_port,
            "HttpPort": self.http_port, "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
            "DicomCheckCalledAet": False, "DicomAlwaysAllowStore": True, "Plugins": [], "StorageCompression": False,
            "DicomScpTimeout": 30, "OverwriteInstances": True,
        }
        (folder / "orthanc.json").write_text(json.dumps(config))
        self.proc = subprocess.Popen([_binary("Orthanc"), str(folder / "orthanc.json")], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        for _ in range(300):
            try:
                self.get("/system")
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("Orthanc did not start")

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=30) as r:
            return json.loads(r.read())

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def _spool_idle(spool: Path) -> bool:
    """Every series in the spool has its results stored (or is in failed/): the bridge has nothing left to do."""
    states = [json.loads(f.read_text()).get("state") for f in (spool / "series").glob("*/state.json")]
    return all(state == "stored" for state in states)


def _write_series(i: int, folder: Path) -> tuple[str, str, tuple[int, ...]]:
    """Series ``i``: its own seed's scan at 1 mm as an axial MR series; (study UID, series UID)."""
    from neuroexplain.lab.dicom_synth import write_series
    from neuroexplain.volumes import read_scan

    volume = read_scan(one_mm_scan_bytes(seed=1_000_001 + i))
    series = write_series(volume.data, volume.affine, folder, orientation="axial", rescale=(0.05, 0.0),
                          patient_name=f"BENCH^{i:02d}", patient_id=f"BENCH{i:02d}", uid_seed=f"bench-pacs-{i}")
    return series.study_uid, series.series_uid, tuple(volume.data.shape)


def main() -> dict[str, Any]:
    from neuroexplain.pacs.bridge import series_digest

    storescu = _binary("storescu")
    expected_per_series = 1 + 2 * bool(METHOD)
    with tempfile.TemporaryDirectory(prefix="bench-pacs-") as tmp_name:
        tmp = Path(tmp_name)
        t = time.perf_counter()
        with concurrent.futures.ProcessPoolExecutor(2) as pool:
            written = list(pool.map(_write_series, range(SERIES), [tmp / "in" / f"{i:02d}" for i in range(SERIES)]))
        uids = [(study, series) for study, series, _ in written]
        folders = [sorted((tmp / "in" / f"{i:02d}").glob("*.dcm")) for i in range(SERIES)]
        _write_series(SERIES, tmp / "warm")
        warm_files = sorted((tmp / "warm").glob("*.dcm"))
        bytes_sent = sum(p.stat().st_size for files in folders for p in files)
        print(f"wrote {SERIES} series, {sum(map(len, folders))} instances, {bytes_sent / 1e6:.0f} MB "
              f"in {time.perf_counter() - t:.0f} s", file=sys.stderr)

        env = {**os.environ, "NEUROEXPLAIN_AUDIT_LOG": "off"}
        gw_port = _free_port()
        gateway = subprocess.Popen(
            [sys.executable, "-m", "neuroexplain.cli.main", "serve", "--backend", "inprocess", "--host", "127.0.0.1",
             "--port", str(gw_port), "--metrics-port", "-1", "--health-port", "-1", "--cache", "none"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
        assert gateway.stdout is not None
        if gateway.stdout.readline().strip() != "ready":
            raise RuntimeError("the gateway did not start")
        # warm the gateway (model load, first-call costs) with one more series, through the bridge's own gRPC code
        from neuroexplain.client import Client
        from neuroexplain.pacs.bridge import grpc_analyse

        warm_client = Client(f"127.0.0.1:{gw_port}")
        t = time.perf_counter()
        grpc_analyse(warm_client, MODEL, [METHOD] if METHOD else [])([p.read_bytes() for p in warm_files])
        warm_s = time.perf_counter() - t
        warm_client.close()
        dest = Orthanc(tmp / "orthanc")
        bridge_port, metrics_port = _free_port(), _free_port()
        spool = tmp / "spool"
        bridge_log = tmp / "bridge.log"
        bridge = subprocess.Popen(
            [sys.executable, "-m", "neuroexplain.pacs", "--spool", str(spool), "--host", "127.0.0.1",
             "--port", str(bridge_port), "--metrics-port", str(metrics_port), "--server", f"127.0.0.1:{gw_port}",
             "--model", MODEL, *(["--method", METHOD] if METHOD else []), "--allow-ae", "MODALITY",
             "--send-to", f"ORTHANC@127.0.0.1:{dest.dicom_port}", "--quiet-seconds", str(QUIET_SECONDS)],
            stdout=subprocess.PIPE, stderr=open(bridge_log, "wb"), text=True, env=env)  # noqa: SIM115
        assert bridge.stdout is not None
        if bridge.stdout.readline().strip() != "ready":
            raise RuntimeError("the bridge did not start: " + bridge_log.read_text()[-2000:])
        try:
            study_of_series = {series_digest(series): study for study, series in uids}
            t0 = time.time()
            senders = [subprocess.Popen([storescu, "-aet", "MODALITY", "-aec", "NEUROEXPLAIN", "127.0.0.1",
                                         str(bridge_port), *map(str, files)],
                                        stdout=subprocess.DEVNULL, stderr=open(tmp / f"storescu-{i}.log", "wb"))  # noqa: SIM115
                       for i, files in enumerate(folders)]
            seen: dict[str, dict[str, Any]] = {}  # Orthanc id -> tags, with the time first listed
            deadline = time.monotonic() + 3600
            while time.monotonic() < deadline:
                for oid in dest.get("/instances"):
                    if oid not in seen:
                        tags = dest.get(f"/instances/{oid}/simplified-tags")
                        seen[oid] = {"at": time.time(), "study": tags.get("StudyInstanceUID"),
                                     "sop": tags.get("SOPInstanceUID"), "modality": tags.get("Modality")}
                per_study: dict[str, list[dict[str, Any]]] = {}
                for v in seen.values():
                    per_study.setdefault(str(v["study"]), []).append(v)
                done = [s for s, _ in uids if len(per_study.get(s, [])) >= expected_per_series]
                if len(done) == SERIES and all(p.poll() is not None for p in senders):
                    break
                if all(p.poll() is not None for p in senders) and _spool_idle(spool):
                    break  # a sender failed: what the bridge got is processed, the check below says what is missing
                if bridge.poll() is not None:
                    raise RuntimeError("the bridge died: " + bridge_log.read_text()[-2000:])
                time.sleep(0.25)
            else:
                raise RuntimeError(f"only {len(done)} of {SERIES} series stored within an hour")
            t_end = max((v["at"] for v in seen.values()), default=time.time())
            time.sleep(2)  # anything late (a duplicate) would show up now
            final = dest.get("/instances")
            send_rc = [p.wait() for p in senders]
            errors_out = [(tmp / f"storescu-{i}.log").read_text(errors="replace") for i in range(SERIES)]
            bridge_rss, gateway_rss = _hwm_mb(bridge.pid), _hwm_mb(gateway.pid)
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
                metrics = r.read().decode()
        finally:
            bridge.send_signal(signal.SIGTERM)
            bridge.wait(120)
            gateway.send_signal(signal.SIGTERM)
            gateway.wait(120)
            dest.stop()
        OUT.mkdir(exist_ok=True)
        shutil.copy(bridge_log, OUT / f"{NAME}-bridge.log")  # series digests and states only
        lasts = [float(json.loads(f.read_text())["last"]) for f in (spool / "series").glob("*/state.json")]
        latencies = []
        for state_file in (spool / "series").glob("*/state.json"):
            state = json.loads(state_file.read_text())
            study = study_of_series[state_file.parent.name]
            if not per_study.get(study):
                continue
            stored_at = max(v["at"] for v in per_study[study])
            latencies.append(stored_at - float(state["last"]))
        sops = [v["sop"] for v in seen.values()]
        failed = sorted(p.name for p in (spool / "failed").iterdir())
        all_stored = (
            len(final) == len(seen) == SERIES * expected_per_series and len(set(sops)) == len(sops)
            and all(len(per_study[s]) == expected_per_series for s, _ in uids) and not failed
            and len(latencies) == SERIES and send_rc == [0] * SERIES
        )
        elapsed = t_end - t0
        result = {
            "series": SERIES,
            "volume_shape_1mm": list(written[0][2]),
            "series_shape": f"{written[0][2][2]} axial MR images of {written[0][2][1]} x {written[0][2][0]} int16, "
                            "uncompressed",
            "instances_sent": sum(map(len, folders)),
            "bytes_sent": bytes_sent,
            "model": MODEL,
            "method": METHOD or None,
            "backend": "inprocess (neuroexplain serve --backend inprocess, --cache none)",
            "quiet_seconds": QUIET_SECONDS,
            "gateway_warm_up_s": warm_s,
            "storescu_exit_codes_all_zero": send_rc == [0] * SERIES,
            "storescu_failures": [e[-300:] for p, e in zip(senders, errors_out, strict=True) if p.returncode],
            "results_in_orthanc": len(final),
            "results_expected": SERIES * expected_per_series,
            "distinct_result_uids": len(set(sops)),
            "failed": len(failed),
            "all_stored_none_lost_or_duplicated": all_stored,
            "seconds_first_send_to_last_instance": max(lasts) - t0,
            "seconds_first_send_to_last_stored": elapsed,
            "series_per_minute": SERIES / elapsed * 60,
            "last_instance_to_stored_s": {"p50": statistics.median(latencies), "p95": p95(latencies),
                                          "max": max(latencies), "all": sorted(latencies)} if latencies else None,
            "bridge_peak_rss_mb": bridge_rss,
            "gateway_peak_rss_mb": gateway_rss,
            "bridge_series_stored_total": next((float(line.split()[-1]) for line in metrics.splitlines()
                                                if line.startswith("neuroexplain_pacs_series_stored_total ")), 0.0),
        }
    save(NAME, result)
    if not all_stored:
        raise SystemExit("bench pacs: results missing, extra or failed (see above)")
    return result


if __name__ == "__main__":
    main()
