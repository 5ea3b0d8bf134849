"""What a run evaluates, and the evaluation itself, run wherever the model is.

An `EvalPlan` names the rows (validation, test, out-of-domain targets), the ICL baseline's demo draws
and whether the trained adapter is scored. `run_evals` scores them on the model in hand: in the
process that trained (`train.num_workers: 0`), or inside the Ray Train workers after the last stage,
where each rank scores every W-th row and the ranks exchange their rows (`Shard`). Metrics are
computed from all rows on every rank, so they do not depend on the worker count except through
batch padding.

The ICL baseline is the base model with N-1 demos: on a model holding an adapter it runs with the
adapter disabled, which gives exactly the base model's outputs.

With `similarity` the plan also measures activation similarity to the teacher on the similarity rows
(`ia2ray.core.similarity`): of the trained adapter, or of the base model in an ICL-only run. The runner
fills it in (it needs the tokenizer and the teacher's cache entry) and hands the rows' items over.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, Optional

from ia2ray.config.schema import EvalConfig, RunConfig
from ia2ray.core.evaluate import icl_summary, rows_metrics, score_rows
from ia2ray.core.fingerprint import content_hash
from ia2ray.core.rundata import RunData, eval_sets
from ia2ray.core.similarity import SimilarityRef, row_similarities, summarize
from ia2ray.data.examples import Example
from ia2ray.data.tasks import TaskSpec


@dataclass
class EvalPlan:
    sets: list[tuple[str, TaskSpec, list[Example]]]  # (summary key, task, rows)
    cfg: EvalConfig
    demo_spec: TaskSpec  # the training task: it formats the ICL demos, also before OOD queries
    icl_draws: list[list[Example]] = field(default_factory=list)  # the ICL baseline's demo sets; []: no baseline
    trained: bool = True  # score the trained model (False: only the ICL baseline)
    similarity: Optional[SimilarityRef] = None  # measure activation similarity (set by the runner)

    def fingerprint(self) -> str:
        """What decides the results (a finished Ray Train run is reused only for the same plan)."""
        return content_hash({
            "sets": [[k, s.model_dump(mode="json"), [e.__dict__ for e in rows]] for k, s, rows in self.sets],
            "cfg": self.cfg.model_dump(mode="json"), "demo_spec": self.demo_spec.model_dump(mode="json"),
            "icl": [[e.__dict__ for e in d] for d in self.icl_draws], "trained": self.trained,
            "similarity": [self.similarity.key, self.similarity.site] if self.similarity else None,
        })


def eval_plan(cfg: RunConfig, data: RunData, splits: tuple[str, ...], trained: bool = True) -> EvalPlan:
    """Score `splits` (with "test": the OOD targets too), plus the ICL baseline when the config asks."""
    return EvalPlan(eval_sets(data, splits), cfg.eval, data.spec, data.icl_draws, trained)


def _alone(rows: list) -> list[list]:
    return [rows]


@dataclass
class Shard:
    """This process's share of the rows: rank r of `world` scores rows r, r + world, ...;
    `gather(mine)` returns every rank's list (a collective call under Ray Train)."""

    rank: int = 0
    world: int = 1
    gather: Callable[[list], list[list]] = _alone

    def score(self, rows: list, fn: Callable[[list], list]) -> list:
        """`fn` on this rank's rows, then all ranks' results back in row order."""
        parts = self.gather(fn(rows[self.rank :: self.world]))
        out = [None] * len(rows)
        for r, part in enumerate(parts):
            out[r :: self.world] = part
        return out


def adapter_disabled(model):
    """The base model's outputs from a model that may hold a LoRA adapter."""
    disable = getattr(model, "disable_adapter", None)
    return disable() if callable(disable) else nullcontext()


def run_evals(model, tokenizer, plan: EvalPlan, device, shard: Optional[Shard] = None,
              sim_items: Optional[list] = None) -> tuple[dict, dict]:
    """(metrics, answers): metrics per summary key, plus "icl" (per key) for the ICL baseline and "sim"
    (`similarity.summarize`, with its site and seconds) when the plan measures similarity on `sim_items`;
    answers per key (and "icl/<key>" for the first demo draw): each row's prediction and whether it was right."""
    shard = shard or Shard()
    model.eval()
    metrics: dict = {}
    answers: dict = {}
    if plan.icl_draws:
        icl = {}
        with adapter_disabled(model):
            for key, spec, rows in plan.sets:
                runs = []
                for i, demos in enumerate(plan.icl_draws):
                    scored = shard.score(rows, lambda part: score_rows(model, tokenizer, spec, part, plan.cfg, device,
                                                                      demos=demos, demo_spec=plan.demo_spec))
                    runs.append(rows_metrics(spec, scored, plan.cfg))
                    if i == 0:
                        answers[f"icl/{key}"] = scored
                icl[key] = icl_summary(runs)
        metrics["icl"] = icl
    if plan.trained:
        for key, spec, rows in plan.sets:
            scored = shard.score(rows, lambda part: score_rows(model, tokenizer, spec, part, plan.cfg, device))
            metrics[key] = rows_metrics(spec, scored, plan.cfg)
            answers[key] = scored
    if plan.similarity is not None:
        if sim_items is None:
            raise ValueError("the evaluation plan measures similarity but no similarity rows were given")
        start = time.perf_counter()
        with nullcontext() if plan.trained else adapter_disabled(model):  # an ICL-only run: the base model's
            rows = shard.score(sim_items, lambda part: row_similarities(model, part, plan.similarity.site,
                                                                        tokenizer.pad_token_id, device, plan.cfg.batch_size))
        metrics["sim"] = {**summarize(rows), "site": plan.similarity.site,
                          "seconds": round(time.perf_counter() - start, 3)}
    return metrics, answers
