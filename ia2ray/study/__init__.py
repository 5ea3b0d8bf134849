"""The study layer: Ray Tune + Optuna search over IA2 configs, confirmation on the test split, report.

Modules, in the order a study uses them: `space` (the searched parameters), `plan` (resources per
trial, concurrency), `teacher` (capture once per key before the trials), `trial` (the Tune function
trainables), `search` (Tune + OptunaSearch), `confirm` (best configs and baselines over seeds),
`report` (report.md/csv) with `plots` (the figures), `records` (what the study records in MLflow,
through `ia2ray.tracking`), `driver` (all of it, top to bottom).
"""
