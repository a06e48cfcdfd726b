"""Training over several processes: the launcher's ranks, DDP or FSDP2, sharded checkpoints.

    world.py       which process this is (from torchrun's / accelerate's environment) and memtune's
                   own collectives (sums of a few scalars)
    config.py      the `distributed:` recipe section
    parallel.py    the strategies (one process, replicated, DDP, FSDP2) behind one interface
    checkpoint.py  torch.distributed.checkpoint checkpoints, resumable at any world size
    comm.py        bytes each rank sends, counted from the collectives themselves

No launcher of memtune's own: `torchrun --nproc_per_node N -m memtune train recipe.yaml`, or
`accelerate launch --multi_gpu ... -m memtune train recipe.yaml`.
"""
