"""The operator's malloc arenas: capped before its threads start, as the process measures it."""

import json
import subprocess
import sys

import pytest

from kubetune.k8s.memory import limit_malloc_arenas

# In a fresh interpreter: cap the arenas (or not), let 6 threads allocate, count glibc's thread
# arenas in /proc/self/maps (a read-write mapping at a 64 MiB boundary, the rest of its 64 MiB
# reserved and unreadable).
PROBE = """
import json, sys, threading
from kubetune.k8s.memory import limit_malloc_arenas
capped = limit_malloc_arenas(1) if sys.argv[1] == "cap" else None
held = []
threads = [threading.Thread(target=lambda: held.append([bytearray(65536) for _ in range(8)])) for _ in range(6)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
maps = [line.split() for line in open("/proc/self/maps")]
arenas = 0
for this, after in zip(maps, maps[1:]):
    start, end = (int(x, 16) for x in this[0].split("-"))
    after_start, after_end = (int(x, 16) for x in after[0].split("-"))
    if (len(this) == 5 and this[1] == "rw-p" and start % (64 << 20) == 0 and after[1] == "---p"
            and after_start == end and after_end - start == 64 << 20):
        arenas += 1
print(json.dumps({"capped": capped, "arenas": arenas}))
"""


def probe(mode: str) -> dict:
    done = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin"}, check=True)
    return json.loads(done.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's arenas, as Linux maps them")
def test_threads_started_after_the_cap_share_the_main_arena():
    uncapped, capped = probe("free"), probe("cap")
    assert uncapped["arenas"] >= 1, uncapped  # the probe sees the arenas threads get
    assert capped == {"capped": True, "arenas": 0}


def test_an_explicit_malloc_arena_max_stands():
    assert limit_malloc_arenas(2, environ={"MALLOC_ARENA_MAX": "4"}) is False


# In a fresh interpreter: free an 8 MiB block, then hold a 1 MiB one; glibc's count of bytes in
# blocks mapped on their own (mallinfo2's hblkhd) says where the 1 MiB went.
THRESHOLD_PROBE = """
import ctypes, json, sys
from kubetune.k8s.memory import fix_mmap_threshold
fixed = fix_mmap_threshold() if sys.argv[1] == "fix" else None
class Info(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
before = libc.mallinfo2().hblkhd
big = bytearray(8 << 20)
del big
held = bytearray(1 << 20)
print(json.dumps({"fixed": fixed, "mapped": libc.mallinfo2().hblkhd - before}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_a_large_block_stays_a_mapping_of_its_own_after_a_larger_one_was_freed():
    def run(mode: str) -> dict:
        done = subprocess.run([sys.executable, "-c", THRESHOLD_PROBE, mode], capture_output=True, text=True,
                              timeout=60, env={"PATH": "/usr/bin:/bin"}, check=True)
        return json.loads(done.stdout)

    dynamic, fixed = run("free"), run("fix")
    assert dynamic["mapped"] < 1 << 20, dynamic  # glibc's own rule: the 1 MiB went into the heap
    assert fixed == {"fixed": True, "mapped": fixed["mapped"]} and fixed["mapped"] >= 1 << 20, fixed


def test_an_explicit_mmap_threshold_stands():
    from kubetune.k8s.memory import fix_mmap_threshold

    assert fix_mmap_threshold(environ={"MALLOC_MMAP_THRESHOLD_": "131072"}) is False
