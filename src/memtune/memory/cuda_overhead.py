"""What a CUDA run holds beyond the tensors the memory tracker counts, line by line, with sources.

The tracker counts tensor storages; a plan for a GPU also rounds each of them up to the caching
allocator's 512-byte blocks (MemoryTracker(block=512)), which is what `torch.cuda.max_memory_allocated`
reports. Outside the allocator's view a process also holds:

- the CUDA context (driver state, kernels of the loaded libraries): 287 MB with lazy module loading
  (CUDA >= 11.7's default) and 667 MB eager (pytorch#86509); 300-426 MB are typical reports
  (pytorch#107667, unsloth-zoo#1053). Planned at 450 MiB, margin +-200 MiB.
- the cuBLAS workspace of the handle torch creates: `CUBLAS_WORKSPACE_CONFIG` ":4096:2:16:8" by
  default, 2 x 4096 KiB + 8 x 16 KiB = 8,519,680 B (seen in allocator snapshots on
  discuss.pytorch.org); allocated through the caching allocator, so inside max_memory_allocated on
  recent torch, listed for what nvidia-smi shows.
- the cuBLASLt workspace: 1 MiB, 4 MiB on Ampere GPUs with >= 24 GB, 32 MiB on sm90+ (Hopper)
  (pytorch#120925).
- fragmentation: the caching allocator reserves segments (2 MiB for small blocks, 20 MiB and up for
  large) and cannot always reuse freed holes; not a fixed number. The verdict asks for 10% of the
  peak as headroom ([unverified] rule of thumb) and suggests `expandable_segments:True`.

Not counted at all: NCCL buffers (multi-GPU), kernel scratch memory inside one call, torch.compile,
bitsandbytes' paged optimizer state that has spilled to the host.
"""

from __future__ import annotations

from dataclasses import dataclass

MIB = 1 << 20
ALLOCATOR_BLOCK = 512  # bytes: the CUDA caching allocator's rounding of every allocation
FRAGMENTATION_HEADROOM = 0.10


@dataclass
class Overhead:
    name: str
    bytes: int
    margin: int  # +- bytes
    source: str

    def to_dict(self) -> dict:
        return dict(self.__dict__)


# GPU name -> (total memory as the driver reports it, cuBLASLt workspace)
GPUS: dict[str, tuple[int, int]] = {
    "t4": (15360 * MIB, 1 * MIB),
    "v100-16gb": (16160 * MIB, 1 * MIB),
    "v100-32gb": (32510 * MIB, 1 * MIB),
    "rtx3090": (24576 * MIB, 4 * MIB),
    "rtx4090": (24564 * MIB, 4 * MIB),
    "a10": (23028 * MIB, 1 * MIB),
    "l4": (23034 * MIB, 1 * MIB),
    "l40s": (46068 * MIB, 4 * MIB),
    "a6000": (49140 * MIB, 4 * MIB),
    "a100-40gb": (40960 * MIB, 4 * MIB),
    "a100-80gb": (81920 * MIB, 4 * MIB),
    "h100": (81559 * MIB, 32 * MIB),
    "h200": (143771 * MIB, 32 * MIB),
}


def overheads(gpu: str | None) -> list[Overhead]:
    """The lines a CUDA plan adds to the tracker's peak (`gpu`: a GPUS name, for the cuBLASLt size;
    None: the largest, 32 MiB)."""
    lt = GPUS[gpu][1] if gpu in GPUS else 32 * MIB
    return [
        Overhead("CUDA context", 450 * MIB, 200 * MIB,
                 "287 MB lazy / 667 MB eager module loading (pytorch#86509); 300-426 MB typical (pytorch#107667)"),
        Overhead("cuBLAS workspace", 8_519_680, 0, "CUBLAS_WORKSPACE_CONFIG :4096:2:16:8 (torch's default)"),
        Overhead("cuBLASLt workspace", lt, 0, "1 MiB; 4 MiB Ampere >= 24 GB; 32 MiB sm90+ (pytorch#120925)"),
    ]
