"""Memory: live-byte tracking, measurements of our modules on fake tensors, the per-rank memory plan."""
