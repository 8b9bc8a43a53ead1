"""Process memory for the benchmark scripts (no jax/torch import)."""

import resource


def peak_rss_bytes() -> int:
    """This process' peak resident set (``VmHWM``; ``ru_maxrss`` can carry a parent's peak over exec)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # kB on Linux
