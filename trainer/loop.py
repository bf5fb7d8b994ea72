"""The step loop: accumulate, clip, step, log, eval, checkpoint. It knows engines and ModelOutput, no model family;
what a checkpoint holds and where it goes is the Checkpointer's."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import torch
from tqdm import tqdm

from trainer.base import metrics as keys
from trainer.base.batch import scored_per_row, scored_tokens
from trainer.base.metrics import EvalMetrics, StepMetrics
from trainer.callbacks import CallbackList
from trainer.checkpoint import Checkpointer
from trainer.evaluation import evaluate
from trainer.run_state import LoopState
from trainer.stop_signals import StopSignals

log = logging.getLogger(__name__)


class TrainingLoop:
    def __init__(self, cfg, engine, stream, eval_sets, tracker, callbacks: CallbackList, run_dir: Path,
                 checkpointer: Checkpointer, state: LoopState | None = None, stop_signals: StopSignals | None = None):
        self.cfg, self.engine, self.stream, self.eval_sets = cfg, engine, stream, eval_sets
        self.stop_signals = stop_signals
        self.tracker, self.callbacks, self.run_dir = tracker, callbacks, run_dir
        self.checkpointer = checkpointer
        self.state = state or LoopState()
        self.tokens_per_step = (cfg.train.batch_size * cfg.data.block_size * cfg.train.grad_accum_steps
                                * engine.world_size)

    # -- one optimizer update ------------------------------------------------------------------------
    def _scored_share(self, batches: list[dict]) -> tuple[list[float], dict[str, float]]:
        """Each micro-batch's share of the update's scored targets, over every process, and what is logged of
        them. The LM loss of an update is the mean over all its scored tokens (an SFT batch scores only
        assistant tokens, a different number per micro-batch), not a mean of per-micro-batch means. Without
        labels every micro-batch scores B * (T - 1) targets, so each share is 1 / (accum * world) and no
        reduction is needed."""
        world = self.engine.world_size
        if not any("labels" in b for b in batches):
            scored = [scored_tokens(b) for b in batches]
            return [n / (sum(scored) * world) for n in scored], {}
        per_row = [scored_per_row(b) for b in batches]  # one count per micro-batch: its total and its empty rows
        scored = [int(rows.sum()) for rows in per_row]
        empty = sum(int((rows == 0).sum()) for rows in per_row)
        totals = self.engine.all_reduce_sum(torch.tensor([sum(scored), empty], dtype=torch.float64,
                                                         device=self.engine.device)).cpu()
        total, empty_total = float(totals[0]), float(totals[1])
        # A block whose labels are all masked adds nothing to the loss and is counted; an update with no
        # scored token at all (never, with packed SFT data) contributes no gradient rather than a NaN.
        return [n / max(total, 1.0) for n in scored], {keys.SCORED_TOKENS: total,
                                                       keys.BLOCKS_WITHOUT_TARGETS: empty_total}

    def train_step(self) -> tuple[StepMetrics, bool]:
        """One update; returns its metrics and whether any process has been asked to stop (see StopSignals)."""
        engine, accum = self.engine, self.cfg.train.grad_accum_steps
        batches = [self.stream.next_batch() for _ in range(accum)]
        shares, counted = self._scored_share(batches)
        even = 1.0 / (accum * engine.world_size)  # the weight of a per-micro-batch value in the update's mean
        sums: dict[str, torch.Tensor] = {}  # flat keys of the scalars logged every step, as summands of means
        routing: dict[str, torch.Tensor] = {}  # the model's routing statistics, by its own names
        for micro, batch in enumerate(batches):
            batch = {k: v.to(engine.device, non_blocking=True) for k, v in batch.items()}
            with engine.micro_step(is_last=micro == accum - 1):
                out = engine.forward(batch)
                aux = sum(out.aux_losses.values()) if out.aux_losses else None
                lm = out.lm_loss * shares[micro]
                # x world: DDP and DeepSpeed average gradients over processes, the shares sum to 1 over them.
                engine.backward(lm * engine.world_size + (aux * (1.0 / accum) if aux is not None else 0.0))
            parts = {keys.TRAIN_LOSS: lm + aux * even if aux is not None else lm, keys.TRAIN_LM_LOSS: lm,
                     **{keys.aux_loss(k): v * even for k, v in out.aux_losses.items()},
                     **{keys.train_metric(k): v * even for k, v in out.metrics.items()}}
            for into, values in ((sums, parts), (routing, {k: v * even for k, v in out.routing.items()})):
                for key, value in values.items():
                    # On the engine's device: one torch.cat below takes them all, and a family's metric made
                    # without device= (a Python number wrapped in a tensor) must not break a GPU run.
                    value = value.detach().float().to(engine.device)
                    into[key] = into[key] + value if key in into else value
        grad_norm = engine.optimizer_step()
        # One reduction for everything logged, scalars and per-expert vectors alike: each summand is already
        # weighted, so the sum is the mean over micro-batches and processes. Every process thus sees the same
        # metrics, so callbacks that stop the run on them (collapse, non-finite loss) decide the same on every
        # rank; a rank that stopped alone would leave the others waiting in a collective forever. The
        # reduction also carries this process's stop flag, so every process learns of a signal any one of
        # them got, at the same update.
        named = [*sums.items(), *routing.items()]
        flat = [value.reshape(-1) for _, value in named]
        stacked = torch.cat(flat)
        asked_to_stop = self.stop_signals is not None and self.stop_signals.received is not None
        stacked = engine.all_reduce_sum(torch.cat([stacked, stacked.new_tensor([float(asked_to_stop)])])).cpu()
        stacked, stop_votes = stacked[:-1], float(stacked[-1])
        means = [values.tolist() if values.numel() > 1 else float(values) for values in
                 stacked.split([f.numel() for f in flat])]
        logged = dict(zip(sums, means[:len(sums)], strict=True))
        step_routing = dict(zip(routing, means[len(sums):], strict=True))
        for stat, value in step_routing.items():  # per-expert fractions and the like, logged element-wise
            logged.update(keys.flatten(keys.router(stat), value))
        logged[keys.GRAD_NORM] = grad_norm
        logged.update(counted)
        logged.update(self.stream.pop_metrics())  # the domain mix this update actually trained on
        return StepMetrics(logged=logged, routing=step_routing), stop_votes > 0

    # -- the whole run -------------------------------------------------------------------------------
    def run(self) -> LoopState:
        cfg, state, engine = self.cfg, self.state, self.engine
        if cfg.train.eval_at_start and state.step == 0:
            self._eval()
        engine.model.train()
        self.callbacks.on_train_start(state.step)
        # A context manager, so an error escaping a step closes the bar and its message starts on its own line.
        with tqdm(total=cfg.train.max_steps, initial=state.step, disable=not engine.is_main,
                  desc="train", unit="step", dynamic_ncols=True, mininterval=0.5) as bar:
            self._train_until_stop(bar)
        if state.stopped_by_signal:
            return state
        self.checkpointer.save_final_model(state)
        if engine.is_main:
            self.callbacks.on_train_end(self.run_dir, EvalMetrics.from_flat(state.last_eval))
        return state

    def _train_until_stop(self, bar) -> None:
        """Updates until max_steps, a callback's stop reason or a stop signal; evals and checkpoints as due."""
        cfg, state, engine = self.cfg, self.state, self.engine
        window_tokens, window_start = 0, time.perf_counter()
        while state.step < cfg.train.max_steps and state.stop_reason is None:
            lr = engine.lr()
            metrics, signalled = self.train_step()
            state.step += 1
            state.tokens_seen += self.tokens_per_step
            window_tokens += self.tokens_per_step
            elapsed = time.perf_counter() - window_start
            tokens_per_sec = window_tokens / max(elapsed, 1e-9)
            metrics.logged.update({keys.LEARNING_RATE: lr, keys.TOKENS: float(state.tokens_seen),
                                   keys.TOKENS_PER_SEC: tokens_per_sec})
            router_due = state.step % cfg.train.log_router_every == 0
            if state.step % cfg.train.log_every == 0 or router_due:
                self.tracker.log({k: v for k, v in metrics.logged.items() if router_due or not keys.is_router(k)},
                                 step=state.step)
            state.stop_reason = self.callbacks.on_step_end(state.step, metrics)
            # Postfix first: update() redraws, so the bar shows this step's loss, not the previous one's.
            bar.set_postfix(loss=f"{metrics.loss:.4f}", tok_s=f"{tokens_per_sec:.0f}", refresh=False)
            bar.update(1)
            if state.step % 20 == 0:  # tokens/s over a recent window, not since the start
                window_tokens, window_start = 0, time.perf_counter()
            final = state.step == cfg.train.max_steps or state.stop_reason is not None
            if state.step % cfg.train.eval_every == 0 or final:
                self._eval()
            if signalled and state.stop_reason is None and state.step < cfg.train.max_steps:
                # The grace period before SIGKILL is short: save what resume needs and stop. No final
                # snapshot or figures (the run is not finished); an eval that was due has run above, so
                # the resumed run's metrics match an uninterrupted one's.
                received = self.stop_signals.received or "a stop signal sent to another process"
                state.stop_reason = f"{received} at step {state.step}: checkpoint saved, continue with run.resume=auto"
                state.stopped_by_signal = True
                self.checkpointer.save(state, self.stream, self.callbacks)
                break
            self.checkpointer.save_if_due(state, self.stream, self.callbacks, final=final)

    def _eval(self) -> None:
        metrics = evaluate(self.engine, self.eval_sets, self.cfg.train.batch_size)
        metrics.routing.update(self.callbacks.eval_statistics(metrics))
        flat = metrics.flat()
        self.state.last_eval = flat
        self.tracker.log(flat, step=self.state.step)
        if self.engine.is_main:
            log.info("step %d eval %s", self.state.step,
                     " ".join(f"{k.removeprefix('eval/')}={v:.4f}" for k, v in flat.items() if k.endswith("loss")))
        reason = self.callbacks.on_eval(self.state.step, metrics)
        self.state.stop_reason = self.state.stop_reason or reason
        loss = math.inf if metrics.loss is None else metrics.loss
        if loss < self.state.best_eval_loss:
            self.state.best_eval_loss = loss
            self.checkpointer.save_best_model(self.state)
