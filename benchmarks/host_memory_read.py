"""How fast the CPU streams host weights from each kind of memory a plan can put them in (issue #8: the CPU half
of a partial-offload decode ran ~25% below the isolated mat-vec rate). GPU machine, PyTorch (present there).

    python -m benchmarks.host_memory_read --out R.json [--gib 1] [--threads 16]

Kinds: pageable (malloc-like anonymous memory, the kernel's default page size policy), pageable-huge (the same
with madvise(MADV_HUGEPAGE)), pinned (cudaHostAlloc, what ggml-cuda's host buffer uses), huge-registered
(madvise(MADV_HUGEPAGE) memory, touched, then page-locked with cudaHostRegister). For each: CPU read GB/s (sum of
the buffer as float32, `threads` threads, median of the samples) and host-to-device copy GB/s, plus the
AnonHugePages the process holds after touching it (proof that the huge pages happened).
"""

from __future__ import annotations

import argparse
import datetime
import json
import mmap
import platform
import statistics
import sys
import time


def _anon_huge_kib() -> int:
    for line in open("/proc/self/smaps_rollup"):
        if line.startswith("AnonHugePages:"):
            return int(line.split()[1])
    return -1


def main(argv: list[str]) -> int:
    import torch
    ap = argparse.ArgumentParser()
    ap.add_argument("--gib", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=16)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    n_bytes = int(args.gib * (1 << 30))
    cudart = torch.cuda.cudart()
    device = torch.empty(n_bytes, dtype=torch.uint8, device="cuda")
    keep = []

    def anonymous(huge: bool) -> torch.Tensor:
        buf = mmap.mmap(-1, n_bytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        if huge:
            buf.madvise(mmap.MADV_HUGEPAGE)
        keep.append(buf)
        t = torch.frombuffer(buf, dtype=torch.uint8)
        t.fill_(1)                                   # first touch: the kernel picks the page size here
        return t

    def registered() -> torch.Tensor:
        t = anonymous(True)
        err = cudart.cudaHostRegister(t.data_ptr(), n_bytes, 0)
        assert int(err) == 0, f"cudaHostRegister failed: {err}"
        return t

    kinds = {"pageable": lambda: anonymous(False), "pageable-huge": lambda: anonymous(True),
             "pinned": lambda: torch.ones(n_bytes, dtype=torch.uint8).pin_memory(), "huge-registered": registered}
    result = {"created_utc": datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat(),
              "command": "python -m benchmarks.host_memory_read " + " ".join(argv), "node": platform.node(),
              "thp": open("/sys/kernel/mm/transparent_hugepage/enabled").read().strip(),
              "torch": torch.__version__, "bytes": n_bytes, "threads": args.threads, "kinds": {}}
    for kind, make in kinds.items():
        huge_before = _anon_huge_kib()
        host = make()
        huge_kib = _anon_huge_kib() - huge_before
        floats = host.view(torch.float32)
        read, copy = [], []
        floats.sum()                                 # warm-up
        for _ in range(args.reps):
            t0 = time.perf_counter()
            floats.sum()
            read.append(n_bytes / (time.perf_counter() - t0) / 1e9)
        for _ in range(5):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            device.copy_(host, non_blocking=True)
            torch.cuda.synchronize()
            copy.append(n_bytes / (time.perf_counter() - t0) / 1e9)
        result["kinds"][kind] = {"read_gb_per_s": round(statistics.median(read), 2),
                                 "h2d_gb_per_s": round(statistics.median(copy), 2),
                                 "anon_huge_pages_mib": huge_kib // 1024,
                                 "read_samples": [round(x, 2) for x in read],
                                 "h2d_samples": [round(x, 2) for x in copy]}
        print(kind, {k: v for k, v in result["kinds"][kind].items() if not k.endswith("samples")})
        del floats, host
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
