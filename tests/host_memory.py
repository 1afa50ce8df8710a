"""Host memory of this process while a call runs: the streaming loaders' bound is checked with it.

RssAnon (anonymous resident memory, /proc/self/status) is the process's own memory; a memory-mapped
checkpoint's page cache is not (DESIGN 9). Linux only: tests skip with `HAVE_PROC`.
"""

import os
import threading
import time

HAVE_PROC = os.path.exists("/proc/self/status")


def rss_anon() -> int:
    """Anonymous resident bytes of this process."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status")


def peak_above_baseline(fn):
    """(fn(), peak RssAnon during the call minus RssAnon just before it), sampled every 0.5 ms by a thread
    (and once more after the call)."""
    base, peak, stop = rss_anon(), [0], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], rss_anon())
            time.sleep(0.0005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        result = fn()
    finally:
        stop.set()
        sampler.join()
    return result, max(peak[0], rss_anon()) - base
