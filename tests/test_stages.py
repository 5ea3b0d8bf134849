"""Batches, the student objective and the single-process training stage on tiny models."""

from __future__ import annotations

import math
from contextlib import contextmanager

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ia2ray.config.schema import LoraConfig
from ia2ray.core.batches import TrainItem, collate
from ia2ray.core.capture import capture_icl_activations
from ia2ray.core.model import add_lora, trainable_state
from ia2ray.core.objective import StageObjective, stage_loss
from ia2ray.core.stages import EarlyStopping, NonFiniteLossError, StageSettings, train_stage


@contextmanager
def adapter(model, cfg: LoraConfig, seed: int = 0):
    """A fresh LoRA adapter on `model` for the duration of a test (removed afterwards)."""
    peft = add_lora(model, cfg, seed=seed)
    try:
        yield peft
    finally:
        peft.unload()


def test_collate_places_response_positions_after_the_query():
    a = TrainItem([5, 6, 7], [1, 2], torch.arange(2 * 2 * 3, dtype=torch.float).view(2, 2, 3))
    b = TrainItem([8], [3], torch.ones(2, 1, 3))
    batch = collate([a, b], pad_id=0, layers=[1])
    assert batch.input_ids.tolist() == [[5, 6, 7, 1], [8, 0, 0, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1], [1, 0, 0, 0]]
    assert batch.positions.tolist() == [[2, 3], [0, 0]]
    assert batch.position_mask.tolist() == [[1, 1], [1, 0]]
    assert batch.targets.tolist() == [[1, 2], [3, 0]]
    assert batch.teacher.shape == (1, 2, 2, 3)
    assert torch.equal(batch.teacher[0, 0], a.teacher[1])
    with pytest.raises(ValueError, match="teacher activations cover 1 positions"):
        TrainItem([1], [1, 2], torch.zeros(2, 1, 3))


@pytest.fixture(scope="module")
def llama(tiny_checkpoints):
    path = tiny_checkpoints("llama")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tok


def _items(model, tok, n=4, g=3):
    prompts = [f"Text: good fine happy {i}\nLabel: 1\n\nText: bad sad {i}\nLabel:" for i in range(n)]
    teacher = capture_icl_activations(model, tok, prompts, g)
    return [TrainItem(tok(f"Text: bad sad {i}\nLabel:")["input_ids"], t.token_ids.tolist(), t.activations)
            for i, t in enumerate(teacher)]


def test_student_equal_to_teacher_has_zero_alignment_loss(llama):
    """With the teacher's own prompt as the student's query, the student reproduces the teacher."""
    model, tok = llama
    prompts = ["Text: good\nLabel: 1\n\nText: bad\nLabel:", "Text: a b c\nLabel:"]
    teacher = capture_icl_activations(model, tok, prompts, 4)
    items = [TrainItem(tok(p)["input_ids"], t.token_ids.tolist(), t.activations) for p, t in zip(prompts, teacher)]
    with adapter(model, LoraConfig(rank=2)) as peft:  # LoRA B = 0: same function as the base
        batch = collate(items, tok.pad_token_id)
        for site_loss in ("mse", "cosine"):
            loss = stage_loss(peft, batch, StageObjective("align", align_loss=site_loss))
            assert loss.item() == pytest.approx(0.0, abs=1e-5)


def test_align_stage_lowers_the_loss_and_restores_the_best_adapter(llama):
    model, tok = llama
    items = _items(model, tok)
    with adapter(model, LoraConfig(rank=4)) as peft:
        objective = StageObjective("align", layers=(1, 2))
        settings = StageSettings(lr=1e-2, batch_size=2, max_epochs=8, patience=100, eval_every=1)
        result = train_stage(peft, "align", items, items, objective, settings, tok.pad_token_id, "cpu")
        dev = [h["dev_loss"] for h in result.history if "dev_loss" in h]
        assert dev[0] > 0 and min(dev) < 0.5 * dev[0]
        assert result.steps == 16 and result.epochs == 8 and not result.stopped_early
        assert result.best_dev_loss == min(dev)
        final = stage_loss(peft.eval(), collate(items, tok.pad_token_id, [1, 2]), objective).item()
        assert final == pytest.approx(result.best_dev_loss, rel=1e-5)


def test_early_stopping_counts_checks_without_improvement():
    snaps = iter(range(100))

    def snap():
        return {"id": next(snaps)}

    stop = EarlyStopping(patience=2)
    assert not stop.update(1.0, 0, snap)
    assert not stop.update(0.5, 2, snap)
    assert not stop.update(0.7, 4, snap)
    assert stop.update(0.5, 6, snap)  # equal is not an improvement
    assert (stop.best, stop.best_step) == (0.5, 2)
    assert stop.best_state == {"id": 1}  # snapshot taken at each improvement only


@pytest.mark.parametrize("keep_initial, steps, best_step", [(True, 2, 0), (False, 3, 1)])
def test_stage_stops_early_when_dev_loss_stalls_and_keeps_the_best(llama, keep_initial, steps, best_step):
    """lr = 0 on a tiny Llama: the dev loss is the same at every check, so the first check stays best
    and patience (2 checks) ends the stage: with `keep_initial` the check before step 1 is the first,
    without it (the paper's reference) the check after step 1."""
    model, tok = llama
    items = _items(model, tok, n=2)
    with adapter(model, LoraConfig(rank=2)) as peft:
        settings = StageSettings(lr=0.0, batch_size=1, max_epochs=50, patience=2, eval_every=1,
                                 keep_initial=keep_initial)
        before = trainable_state(peft)
        result = train_stage(peft, "sft", items, items, StageObjective("sft"), settings, tok.pad_token_id, "cpu")
        assert (result.stopped_early, result.steps, result.best_step, result.epochs) == (True, steps, best_step, 2 if steps > 2 else 1)
        dev = [h["dev_loss"] for h in result.history if "dev_loss" in h]
        assert len(dev) == 3 and dev[0] == pytest.approx(dev[-1], rel=1e-6)
        after = trainable_state(peft)
        assert all(torch.equal(before[k], after[k]) for k in before)


def test_non_finite_loss_names_the_step(llama):
    model, tok = llama
    items = _items(model, tok, n=1, g=1)
    bad = [TrainItem(it.query_ids, it.target_ids, it.teacher * math.inf) for it in items]
    with adapter(model, LoraConfig(rank=2)) as peft:
        settings = StageSettings(lr=1e-3, batch_size=1, max_epochs=1, patience=5, eval_every=2)
        with pytest.raises(NonFiniteLossError, match="at step 1"):
            train_stage(peft, "align", bad, items, StageObjective("align"), settings, tok.pad_token_id, "cpu")


def test_align_stops_the_forward_after_the_deepest_aligned_layer(llama):
    model, tok = llama
    items = _items(model, tok, n=2, g=2)
    with adapter(model, LoraConfig(rank=2)) as peft:
        with torch.no_grad():  # non-zero LoRA B so the adapter affects the loss
            for n, p in peft.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.1)
        batch = collate(items, tok.pad_token_id, [0, 1])
        calls = []
        from ia2ray.core.sites import decoder_layers

        handle = decoder_layers(peft)[3].register_forward_hook(lambda *a: calls.append(1))
        grads = {}
        for stop in (True, False):
            peft.zero_grad()
            loss = stage_loss(peft, batch, StageObjective("align", layers=(0, 1), stop_early=stop))
            loss.backward()
            grads[stop] = (loss.detach(), {n: p.grad.clone() for n, p in peft.named_parameters() if p.grad is not None})
            assert len(calls) == (0 if stop else 1)
        handle.remove()
        assert torch.equal(grads[True][0], grads[False][0])
        assert grads[True][1].keys() == grads[False][1].keys() and len(grads[True][1]) > 0
        assert all(torch.equal(grads[True][1][k], grads[False][1][k]) for k in grads[True][1])


def test_dev_loss_is_checked_every_k_steps_and_at_every_epoch_end(llama):
    model, tok = llama
    items = _items(model, tok, n=3, g=1)
    with adapter(model, LoraConfig(rank=2)) as peft:
        for keep_initial, checks in ((True, [0, 2, 3, 4]), (False, [2, 3, 4])):
            settings = StageSettings(lr=1e-3, batch_size=2, max_epochs=2, patience=50, eval_every=3,
                                     keep_initial=keep_initial)
            result = train_stage(peft, "align", items, items, StageObjective("align"), settings, tok.pad_token_id, "cpu")
            assert [h["step"] for h in result.history if "dev_loss" in h] == checks
            assert result.steps == 4


class ScriptedEngine:
    """A `StageEngine` whose dev loss follows a known curve: `curve[k]` at the k-th check. Its adapter
    is the number of steps taken, so the restored snapshot says which check won."""

    def __init__(self, curve):
        self.curve, self.checks, self.steps = list(curve), 0, 0

    def train_step(self, chunk, step):
        self.steps += 1
        return 0.0

    def dev_loss(self):
        self.checks += 1
        return self.curve[self.checks - 1]

    def adapter(self):
        return {"steps": self.steps}

    def train(self):
        pass


@pytest.mark.parametrize("keep_initial, best_step, checks", [(True, 0, 4), (False, 2, 3)])
def test_early_stopping_counts_the_untrained_adapter_only_with_keep_initial(keep_initial, best_step, checks):
    """Training only makes the dev loss worse. With `keep_initial` the adapter the stage started with
    (step 0) wins and comes back; without (the paper's reference) the first check after training wins,
    and patience counts from there: three checks, the stage stops at step 6."""
    from ia2ray.core.stages import stage_loop

    engine = ScriptedEngine([1.0, 2.0, 3.0, 4.0] if keep_initial else [2.0, 3.0, 4.0])
    settings = StageSettings(lr=1e-3, batch_size=1, max_epochs=10, patience=2 if not keep_initial else 3,
                             eval_every=2, keep_initial=keep_initial)
    state = stage_loop("align", settings, [None] * 10, engine)
    assert engine.checks == checks and state.result.stopped_early
    assert state.stopper.best_step == best_step
    assert state.stopper.best_state == {"steps": best_step}
    assert state.stopper.best == (1.0 if keep_initial else 2.0)


def test_non_finite_dev_loss_is_an_error_not_a_crash(llama):
    model, tok = llama
    items = _items(model, tok, n=1, g=1)
    bad = [TrainItem(it.query_ids, it.target_ids, it.teacher * math.nan) for it in items]
    with adapter(model, LoraConfig(rank=2)) as peft:
        settings = StageSettings(lr=1e-3, batch_size=1, max_epochs=1, keep_initial=True)
        with pytest.raises(NonFiniteLossError, match="dev loss is nan at step 0"):
            train_stage(peft, "align", items, bad, StageObjective("align"), settings, tok.pad_token_id, "cpu")


def test_out_of_memory_names_the_batch(llama):
    """A real allocator failure: a 300k-token query next to a short one makes the padded attention
    mask alone 90 GB."""
    from ia2ray.core.stages import StageOutOfMemoryError

    model, tok = llama
    dev = [TrainItem([5] * 10, [6]), TrainItem([5] * 12, [6])]
    huge = [TrainItem([5] * 300_000, [6]), TrainItem([5] * 10, [6])]
    with adapter(model, LoraConfig(rank=2)) as peft:
        with pytest.raises(StageOutOfMemoryError, match=r"stage sft: out of memory at step 1 with a batch of 2 "
                           r"\(train.batch_size=2\).*can't allocate memory"):
            train_stage(peft, "sft", huge, dev, StageObjective(kind="sft"), StageSettings(lr=1e-3, batch_size=2),
                        tok.pad_token_id, "cpu")
