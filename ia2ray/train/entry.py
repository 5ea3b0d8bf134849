"""The function every Ray Train worker runs, in a module that imports nothing heavy.

Ray Train's controller unpickles the train function and its config before it starts the worker
group. With this light entry point and the job pickled to bytes, only the workers import torch,
transformers, peft and ia2ray's training code; the controller does not (`bench/bench_trials.py`).
"""

from __future__ import annotations

import pickle


def train_loop(config: dict) -> None:
    from ia2ray.train.worker import train_loop_per_worker

    train_loop_per_worker({**config, "job": pickle.loads(config["job"])})
