"""Distributed stages: Ray Train runs whose workers train with DeepSpeed ZeRO and evaluate (`train.num_workers >= 1`).

`ray_stages.run_with_ray` is the runner `ia2ray.core.pipeline.run_pipeline` uses (its caller loads no
weights); `capture` runs teacher captures as Ray tasks; `launch.fit` starts the `TorchTrainer`, whose
workers enter through `entry` and run `worker`'s loop (one model load, a DeepSpeed engine per stage,
evaluation at the end); `state` and `checkpoint` make checkpoints world-size independent; `dsconfig`
holds the DeepSpeed presets.
"""
