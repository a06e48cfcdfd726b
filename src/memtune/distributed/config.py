"""The `distributed:` recipe section: how a run is spread over the processes a launcher started.

The number of processes, their ranks and devices are never set here: they come from the launcher's
environment (torchrun, `accelerate launch`, or a scheduler that runs torchrun per node). This section
only says what each process holds:

    strategy   auto   ddp when the launcher started more than one process, else none; fsdp when
                      `accelerate launch --use_fsdp` asked for it
               none   one process (a launcher that started several is an error)
               ddp    every rank holds the whole model; gradients are all-reduced (torch DDP);
                      zeroth-order rules exchange only their losses (no DDP wrapper, no gradients)
               fsdp   parameters, gradients and optimizer state sharded over the ranks (FSDP2,
                      `fully_shard` per layer of `wrap` and once at the root)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ..errors import ConfigError


@dataclass
class MixedPrecisionConfig:
    """FSDP2's MixedPrecisionPolicy: the dtype parameters are all-gathered and computed in, and the
    dtype gradients are reduced in. `none` keeps the parameters' own dtype. Quantized (integer)
    storage is never cast."""

    param: Literal["none", "fp32", "bf16", "fp16"] = "none"
    reduce: Literal["none", "fp32", "bf16", "fp16"] = "none"


@dataclass
class DistributedConfig:
    strategy: Literal["auto", "none", "ddp", "fsdp"] = "auto"
    # fsdp: free each layer's gathered parameters after its forward and gather them again for its
    # backward (less memory, one more all-gather per layer); the root stays gathered for backward
    reshard_after_forward: bool = True
    mixed_precision: MixedPrecisionConfig = field(default_factory=MixedPrecisionConfig)
    cpu_offload: bool = False  # fsdp: sharded parameters, gradients and optimizer state live in CPU memory
    # fsdp: module classes each made one FSDP unit (by class name); None = the model's own
    # `_no_split_modules` (its decoder or encoder layer), e.g. [LlamaDecoderLayer]
    wrap: list[str] | None = None
    # ddp: let DDP search each step's graph for parameters that got no gradient; None = only for
    # adapters that declare they can leave trainable parameters unused
    find_unused_parameters: bool | None = None
    timeout_s: int = 600  # collectives fail (naming the rank) instead of hanging past this
    backend: Literal["auto", "gloo", "nccl"] = "auto"  # auto: gloo for CPU tensors, plus nccl with CUDA

    def check(self, prefix: str) -> None:
        if self.timeout_s < 1:
            raise ConfigError(f"{prefix}.timeout_s: expected a positive number of seconds, got {self.timeout_s}")
        if self.wrap is not None and not self.wrap:
            raise ConfigError(f"{prefix}.wrap: expected at least one layer class name (or leave it out for the "
                              f"model's own layer class)")
