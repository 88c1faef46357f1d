"""Refit: the trainer's weights into a rollout engine that holds its own copy (docs/refit.md).

`shard_refit.ShardRefit` gives each rank only the part of each HF tensor that the engine worker on
its GPU loads (`engine_slices`: TensorRT-LLM's per-rank slicing and the engine layout; `shard_plan`:
which rank holds each part), `buckets.refit` pushes them to the engine bucket by bucket and returns
the step metrics (refit/seconds, refit/gib, refit/buckets). `source.hf_named_tensors` is the full
HF-named stream (TP shards gathered, every stage) that exports and tests compare against.
"""
