"""The IA2 method in pure torch / transformers / peft (no Ray): model and LoRA set-up, activation
sites, teacher capture and its cache, losses, training stages, evaluation, and a run's pipeline
(`ia2ray.core.pipeline.run_pipeline`) with its in-process runner."""
