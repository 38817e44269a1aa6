"""What this process has read from storage and its peak resident set, from /proc.

Kept free of heavy imports: bench's llama.cpp peer (tools/llamacpp_peer.py) measures itself with
these without importing torch.
"""

from __future__ import annotations


def process_read_bytes() -> int:
    """Bytes this process has caused to be read from storage (/proc/self/io read_bytes)."""
    try:
        with open("/proc/self/io") as f:
            for line in f:
                if line.startswith("read_bytes:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def peak_rss_bytes() -> int:
    """This process's peak resident set (VmHWM). Unlike ru_maxrss it is not inherited from a
    parent across fork+exec, so a child started by a large process reports its own peak."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
