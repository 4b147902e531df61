"""What the client commands share when a server answers: the response's placement and input check as JSON.

Light: protobuf messages only (no numpy, no torch).
"""

from __future__ import annotations

from typing import Any

from neuroexplain._proto import neuroexplain_pb2 as pb


def report(response: Any) -> dict[str, Any]:
    """``alignment``, ``input_check`` and ``registration`` of a Predict or Attribute response, as ``--local`` says
    them."""
    out: dict[str, Any] = {}
    if response.info.alignment != pb.ALIGNMENT_UNSPECIFIED:
        out["alignment"] = pb.Alignment.Name(response.info.alignment).removeprefix("ALIGNMENT_").lower()
    if response.HasField("input_check"):
        c = response.input_check
        out["input_check"] = {"in_distribution": c.in_distribution, "score": c.score, "threshold": c.threshold,
                              "reason": c.reason}
    if response.HasField("registration"):
        r = response.registration
        out["registration"] = {"metric": r.metric, "seconds": r.seconds, "transform": list(r.transform)}
    return out
