"""The shared training engine: launch and distributed setup, the loop and its hooks, optimiser,
metrics, run folders, pre-emption."""
