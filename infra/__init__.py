"""Local and cluster infrastructure: the loopback stack tests use, and cluster definitions."""
