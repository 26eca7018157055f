"""glibc keeps freed 1-32 MiB blocks in its heap once its adaptive mmap threshold has grown; the fix returns them."""

from __future__ import annotations

import platform
import subprocess
import sys
import textwrap

import pytest

from prefopt.trainer.host_memory import return_freed_memory_to_os

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# Activation-like blocks (3 MiB) interleaved with small long-lived tensors, then the blocks are freed: the MiB the
# process still holds afterwards.
PROGRAM = textwrap.dedent("""
    import re, sys
    from pathlib import Path
    import torch
    from prefopt.trainer.host_memory import return_freed_memory_to_os

    def rss():
        return int(re.search(r"VmRSS:\\s+(\\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024

    if sys.argv[1] == "fixed":
        assert return_freed_memory_to_os()
    first = torch.ones(3 << 18)
    del first  # a freed mmapped 3 MiB block raises glibc's adaptive threshold above 3 MiB
    base = rss()
    blocks, keep = [], []
    for _ in range(100):
        blocks.append(torch.ones(3 << 18))
        keep.append(torch.ones(1 << 16))
    del blocks
    print(rss() - base)
""")


def _held_mib(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", PROGRAM, mode], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not GLIBC, reason="glibc malloc only")
def test_freed_blocks_go_back_to_the_os():
    adaptive, fixed = _held_mib("adaptive"), _held_mib("fixed")
    assert adaptive > 200  # glibc's default: most of the 300 MiB of freed blocks stay in the process
    assert (
        fixed < 60
    )  # fixed threshold: the blocks were mmapped and are gone; the small tensors (25 MiB) stay


def test_off_glibc_it_is_a_no_op(monkeypatch):
    monkeypatch.setattr(platform, "system", lambda: "Darwin")
    assert return_freed_memory_to_os() is False
