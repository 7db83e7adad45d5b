"""Pure domain model of gpushare: GPUs, partitions, allocations. Standard library only, no I/O."""
