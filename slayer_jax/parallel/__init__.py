"""Several devices and processes: the device mesh and sharding rules by role, multi-controller start-up."""
