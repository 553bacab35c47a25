"""The side-by-side workloads by name: one module each (bench/w1_dispatch.py
... bench/w6_idle_reply.py), their shared machinery in bench/common.py."""

from __future__ import annotations

from bench import scale
from bench import w6_idle_reply
from bench.w1_dispatch import w1_dispatch
from bench.w2_ingest import w2_ingest
from bench.w3_respawn import w3_respawn
from bench.w4_chaos import w4_chaos
from bench.w5_footprint import w5_footprint

WORKLOADS = {
    "w1": w1_dispatch,
    "w2": w2_ingest,
    "w3": w3_respawn,
    "w4": w4_chaos,
    "w5": w5_footprint,
    # A reply after 5 s idle -> Message 2.
    "w6": w6_idle_reply.workload,
    # A campaign of a million contacts; "all" skips it.
    "scale": scale.workload,
}
