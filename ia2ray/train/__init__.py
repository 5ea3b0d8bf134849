"""Distributed stages: Ray Train runs whose workers train with DeepSpeed ZeRO (`train.num_workers >= 1`).

`ray_stages.train_with_ray` is the stage trainer `ia2ray.core.pipeline.run_pipeline` uses; `launch.fit`
starts the `TorchTrainer`; `worker` is the per-worker loop; `state` and `checkpoint` make checkpoints
world-size independent; `dsconfig` holds the DeepSpeed presets.
"""
