"""Send fuzz cases through a gateway's gRPC API and judge each answer (the oracle shared by the short run in
``make test`` and ``make fuzz``).

The oracle: every answer is a status in :data:`ALLOWED` (OK, INVALID_ARGUMENT, RESOURCE_EXHAUSTED for the size
limits, FAILED_PRECONDITION where documented); never INTERNAL or UNKNOWN; never a hang (each call answers within
its deadline: DEADLINE_EXCEEDED is counted as a hang); never UNAVAILABLE (a worker died or TorchServe went away);
no message carries a traceback or the synthetic patient's identity.
"""

from __future__ import annotations

import collections
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import grpc
from cases import PATIENT_WORDS, Case

from neuroexplain._proto import neuroexplain_pb2 as pb

ALLOWED = frozenset({grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED,
                     grpc.StatusCode.FAILED_PRECONDITION})
_TRACEBACK_MARKS = ("Traceback", 'File "', "site-packages/")


@dataclass
class Verdict:
    case: str
    code: grpc.StatusCode
    message: str
    seconds: float
    problem: str = ""  # empty when the answer passes the oracle


@dataclass
class Tally:
    codes: collections.Counter[str] = field(default_factory=collections.Counter)
    hangs: int = 0
    failures: list[Verdict] = field(default_factory=list)
    messages: collections.Counter[tuple[str, str]] = field(default_factory=collections.Counter)
    cases: int = 0
    slowest_s: float = 0.0

    def add(self, verdict: Verdict) -> None:
        self.cases += 1
        self.codes[verdict.code.name] += 1
        if verdict.code != grpc.StatusCode.OK:  # which refusals: the message with its numbers blanked
            self.messages[(verdict.code.name, re.sub(r"[0-9][0-9.e+x-]*", "#", verdict.message)[:90])] += 1
        self.slowest_s = max(self.slowest_s, verdict.seconds)
        if verdict.code == grpc.StatusCode.DEADLINE_EXCEEDED:
            self.hangs += 1
        if verdict.problem:
            self.failures.append(verdict)


def request_for(case: Case, model: str) -> tuple[str, object]:
    if case.is_dicom:
        scan = pb.Scan(dicom=pb.DicomSeries(instances=list(case.instances)))
    else:
        scan = pb.Scan(data=case.data)
    if case.rpc == "visualize":  # a visualization started from the scan: two steps, the stream read to its end
        return "Visualize", pb.VisualizeRequest(model=model, target="class:lesion", steps=2, start="scan", scan=scan)
    if case.rpc == "attribute":
        return "Attribute", pb.AttributeRequest(model=model, scan=scan, method="gradient",
                                                return_dicom=case.return_dicom)
    return "Predict", pb.PredictRequest(model=model, scan=scan, return_dicom=case.return_dicom)


def judge(case: Case, code: grpc.StatusCode, message: str, seconds: float) -> Verdict:
    problem = ""
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        problem = "hang: no answer within the deadline"
    elif code not in ALLOWED:
        problem = f"status {code.name} is not allowed for a malformed scan"
    elif any(mark in message for mark in _TRACEBACK_MARKS):
        problem = "the message carries a traceback"
    elif any(word.lower() in message.lower() for word in PATIENT_WORDS):
        problem = "the message carries the patient's identity"
    elif code != grpc.StatusCode.OK and not message.strip():
        problem = "a refusal without a message"
    return Verdict(case.name, code, message, seconds, problem)


def send(stub: object, case: Case, model: str, deadline_s: float) -> Verdict:
    method, request = request_for(case, model)
    started = time.monotonic()
    try:
        answer = getattr(stub, method)(request, timeout=deadline_s)
        if method == "Visualize":
            for _event in answer:
                pass
        code, message = grpc.StatusCode.OK, ""
    except grpc.RpcError as exc:
        code, message = exc.code(), exc.details() or ""
    return judge(case, code, message, time.monotonic() - started)


def run_cases(stub: object, cases: Iterable[Case], model: str, deadline_s: float) -> Tally:
    tally = Tally()
    for case in cases:
        tally.add(send(stub, case, model, deadline_s))
    return tally
