"""Sparse training machinery: masks, per-layer density allocation, prune/grow policies,
schedules and sparse kernels. "Density" always means the kept fraction of a tensor."""
