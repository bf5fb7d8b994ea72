"""Training streams: endless, deterministic, resumable micro-batches sharded across ranks.

shuffled (BlockStream: every block in a per-epoch shuffle), mixed (MixedStream: domains drawn by a weight
schedule) and schedule (MixSchedule: the weights over training). Importing the package imports nothing.
"""
