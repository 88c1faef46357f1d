"""Refit: the trainer's weights, as HF-named full tensors, streamed to a rollout engine in buckets.

`source.hf_named_tensors` yields (hf_name, tensor) one parameter at a time (TP shards gathered),
`buckets.iter_buckets` groups them by size, `buckets.refit` pushes each bucket to an engine callback
and returns the step metrics (refit/seconds, refit/gib, refit/buckets).
"""
