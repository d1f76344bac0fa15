"""Scale-out beside the single-device model: process groups (dist), FSDP2 sharding (fsdp), Muon on
sharded matrices (muon), and distributed checkpoints (checkpoint). See docs/distributed.md."""
