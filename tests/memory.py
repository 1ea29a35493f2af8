"""Peak memory of a CPU step, read from the allocator's running total that torch.profiler records."""

import json
import tempfile
from pathlib import Path

from torch.profiler import ProfilerActivity, profile


def profiled_peak_bytes(fn) -> int:
    """Peak bytes that fn() had allocated at once beyond what existed before it, from the CPU allocator's running total
    that torch.profiler records with each allocation (profile_memory=True; its "[memory]" trace events)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as folder:
        trace = Path(folder) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    totals = [e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]"]
    assert totals, "the profiler recorded no allocation"
    return max(totals)
