"""Generator service: samples rollouts with the current student weights."""
