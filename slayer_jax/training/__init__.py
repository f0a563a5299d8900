"""Training: the masked, sharded step and its loop, ahead-of-time planning, and recipe files."""
