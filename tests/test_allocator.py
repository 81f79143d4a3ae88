"""epsproxy.net.allocator: glibc's thresholds fixed for large buffers."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from twisted.trial.unittest import SynchronousTestCase

from epsproxy.net import allocator

# A fresh interpreter: one 600 KiB block and one 2 MiB block, alive while glibc counts
# its blocks from fresh pages (mallinfo2's hblks).
_PROBE = textwrap.dedent("""
    import ctypes, sys
    class Info(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in (
            "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost"
        ).split()]
    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = Info
    if sys.argv[1] == "fixed":
        from epsproxy.net.allocator import keep_large_buffers_on_the_heap
        print(keep_large_buffers_on_the_heap({}))
    else:
        print("glibc's own")
    base = libc.mallinfo2().hblks
    middle = bytearray(600 * 1024)
    print(libc.mallinfo2().hblks - base)
    large = bytearray(2 * 1024 * 1024)
    print(libc.mallinfo2().hblks - base)
""")


def _probe(mode: str) -> list[str]:
    done = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True,
                          text=True, timeout=60)
    if done.returncode != 0:
        raise AssertionError(done.stderr)
    return done.stdout.splitlines()


class AllocatorTests(SynchronousTestCase):
    def test_a_block_under_the_threshold_comes_from_the_heap(self):
        said, middle, large = _probe("fixed")
        self.assertEqual(said, "blocks up to 1 MiB from the heap, at most 4 MiB of it kept free")
        self.assertEqual(middle, "0")  # from the heap
        self.assertEqual(large, "1")  # over MMAP_THRESHOLD: fresh pages, as before

    def test_without_it_glibc_gives_a_600_kib_block_fresh_pages(self):
        # What the fix changes: a fresh process maps such a block on its own.
        _, middle, large = _probe("default")
        self.assertEqual((middle, large), ("1", "2"))

    def test_an_operators_settings_stand(self):
        for environ in ({"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=65536"},
                        {"MALLOC_TRIM_THRESHOLD_": "0"}, {"MALLOC_MMAP_THRESHOLD_": "1"}):
            calls: list[tuple[int, int]] = []
            libc = type("Libc", (), {"mallopt": staticmethod(
                lambda *a: calls.append(a) or 1)})()
            self.assertEqual(allocator.keep_large_buffers_on_the_heap(environ, libc),
                             "left as the environment sets it")
            self.assertEqual(calls, [])

    def test_other_tunables_do_not_count_as_the_allocators(self):
        calls: list[tuple[int, int]] = []
        libc = type("Libc", (), {"mallopt": staticmethod(lambda *a: calls.append(a) or 1)})()
        said = allocator.keep_large_buffers_on_the_heap(
            {"GLIBC_TUNABLES": "glibc.pthread.rseq=0"}, libc)
        self.assertIn("from the heap", said)
        self.assertEqual(calls, [(-3, allocator.MMAP_THRESHOLD), (-1, allocator.TRIM_THRESHOLD)])

    def test_a_c_library_without_mallopt_or_refusing_it_changes_nothing(self):
        self.assertEqual(allocator.keep_large_buffers_on_the_heap({}, object()),
                         "left as it is (no mallopt: not glibc)")
        refusing = type("Libc", (), {"mallopt": staticmethod(lambda *a: 0)})()
        self.assertEqual(allocator.keep_large_buffers_on_the_heap({}, refusing),
                         "left as it is (mallopt refused the thresholds)")
