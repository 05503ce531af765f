"""REALM pre-training: one loop for the single process and for every DeepSpeed rank in Ray.

What differs between the two paths is passed in, never branched on inside the loop:
  * `engine`: `TorchEngine` or `DeepSpeedEngine` (trainer/engine.py), same interface;
  * `index`: where top-k comes from and how the corpus gets re-embedded. `StopTheWorldIndex`
    (here) refreshes in this process and blocks; `cluster.actors.ServiceIndex` asks the shard
    service and only publishes the doc encoder for the embedding workers.
Both implement `search`, `version`, `checkpoint_step`, `stats` (refresh duration, blocks/s),
`before_step(step) -> seconds waited` and `after_step(model, step) -> seconds blocked`, which
is what the stall figures count.

Resume: the training state (model, optimizer, scheduler, the numpy generator that draws the
examples and masks, i.e. the data position, and torch's RNG) is saved every
`pretrain.checkpoint_every` steps under checkpoints/step_N; `pretrain.resume=true` continues
from the newest complete one.
"""
from __future__ import annotations

import sys
import time
import uuid

import numpy as np
import torch

from indexer.io import InputError
from trainer import data as D
from trainer.checkpoint import latest_training_state, save_model, save_training_state
from trainer.config import Config
from trainer.engine import param_groups
from trainer.loop import Run, check_k, initial_model, refresh_index, retrieve, sample_queries, stored_index
from trainer.metrics import MetricsLogger
from trainer.model import marginal_token_log_probs, spans_correct


def index_staleness(step: int, index_step: int, frozen_steps: int) -> int:
    """Doc-encoder updates, at `step`, that an index built at `index_step` has not seen. The retriever
    does not move in its first `frozen_steps` steps, so an index built at any step up to then is as
    fresh as one built at `frozen_steps`: no refresh is needed (or waited for) before the tower moves."""
    return max(0, step - max(index_step, min(frozen_steps, step)))


def refresh_due(step: int, every: int, total: int, frozen_steps: int) -> bool:
    """Publish at every `every` steps, except at the end (the run's final model is published by the next
    stage) and while the retriever is frozen (the doc tower is still the one the index was built from)."""
    return step % every == 0 and frozen_steps < step < total


class StopTheWorldIndex:
    """The single-process index: every `every_steps` the trainer stops and re-embeds the corpus.

    At the start it reuses a stored version built by the same doc encoder (ICT's at step 0, this
    run's own at a resume step) instead of re-embedding the corpus.
    """

    def __init__(self, run: Run, model, run_id: str, start_step: int, initial_id: str = ""):
        self.run, self.run_id = run, run_id
        self.every, self.total = run.cfg.refresh.every_steps, run.cfg.pretrain.steps
        self.frozen_steps = run.cfg.pretrain.freeze_retriever_steps
        self.stats = {}
        self.index = stored_index(run, f"{run_id}-{start_step}", initial_id if start_step == 0 else "")
        if self.index is None:
            self._refresh(model, start_step)

    def _refresh(self, model, step: int) -> float:
        t0 = time.perf_counter()
        self.index = refresh_index(self.run, model, step, f"{self.run_id}-{step}")
        seconds = time.perf_counter() - t0
        self.stats = {"refresh_seconds": seconds, "refresh_blocks_per_s": self.index.rows / seconds}
        return seconds

    @property
    def version(self) -> int:
        return self.index.version

    @property
    def checkpoint_step(self) -> int:
        return self.index.checkpoint_step

    def search(self, queries: np.ndarray, k: int, exclude: np.ndarray | None = None):
        return self.index.search(queries, k, exclude)

    def before_step(self, step: int) -> float:
        return 0.0

    def after_step(self, model, step: int) -> float:
        if not refresh_due(step, self.every, self.total, self.frozen_steps):
            return 0.0
        return self._refresh(model, step)


FRESH_HEADS = ("reader.mlm_head", "reader.copy_head", "null_score")  # parameter-name prefixes trained at head_lr


def build_optimizer_groups(model, cfg: Config) -> list[dict]:
    """Reader at lr, fresh heads at head_lr, retriever at retriever_lr (0 while frozen)."""
    c = cfg.pretrain
    groups = param_groups(list(model.reader.named_parameters(prefix="reader")) + [("null_score", model.null_score)],
                          c.lr, c.head_lr, FRESH_HEADS)
    groups.append({"params": list(model.retriever.parameters()), "lr": c.retriever_lr,
                   "frozen_steps": c.freeze_retriever_steps})
    return groups


def batch_metrics(out: dict, batch: D.RealmBatch) -> dict:
    """MLM accuracy (every masked token right under the marginal over z), p(z|x) entropy, p(null)."""
    with torch.no_grad():
        marginal = marginal_token_log_probs(out["scores"], out["token_log_probs"])
        acc = float(spans_correct(marginal, batch.targets, batch.target_mask).float().mean())
        log_p_z = out["scores"].float().log_softmax(-1)
        p_z = log_p_z.exp()
        entropy = float(-(p_z * log_p_z.clamp_min(-1e4)).sum(-1).mean())
    return {"mlm_accuracy": acc, "retrieval_entropy": entropy, "p_null": float(p_z[:, 0].mean())}


def gold_in_topk(queries: list[D.MaskedQuery], cand: np.ndarray) -> float | None:
    hits = D.gold_hits(queries, cand)
    return float(np.mean(hits)) if hits else None


def restore(engine, cfg: Config, run: Run) -> dict | None:
    """The client state of the newest complete training checkpoint, its weights loaded; None = fresh."""
    if not cfg.pretrain.resume:
        return None
    path = latest_training_state(run.dir / "checkpoints")
    if path is None:
        print(f"resume: no complete checkpoint under {run.dir / 'checkpoints'}; starting at step 0", file=sys.stderr)
        return None
    state = engine.load(path)
    print(f"resume: continuing from {path} (step {state['step']})", file=sys.stderr)
    return state


def train_loop(run: Run, model, engine, make_index, log: MetricsLogger | None, rank: int = 0, world: int = 1,
               init: str = "") -> dict:
    """The pre-training steps, from a fresh start or a checkpoint. `make_index(model, run_id,
    start_step)` builds the index client once the start step is known. Returns a summary."""
    cfg, c, k = run.cfg, run.cfg.pretrain, run.cfg.retrieval.k
    micro_batch = c.batch_size // world
    train = D.read_examples(run.dir / "examples" / "train.parquet")
    state = restore(engine, cfg, run)
    rng = np.random.default_rng(cfg.seed + 1 + 1000 * rank)
    if state is None:
        start, run_id = 0, uuid.uuid4().hex
    else:
        start, run_id = state["step"], state["run_id"]
        if len(state["numpy_rng"]) != world:
            raise InputError(f"{run.dir / 'checkpoints'}: step {start} was written by {len(state['numpy_rng'])} "
                             f"trainer(s); resume with cluster.trainers={len(state['numpy_rng'])}")
        rng.bit_generator.state = state["numpy_rng"][rank]
        torch.set_rng_state(state["torch_rng"][rank])
    index = make_index(model, run_id, start)
    t_start = time.time()
    window = {"t": time.perf_counter(), "tokens": 0, "examples": 0}
    totals = {"refresh_blocked": 0.0, "staleness_wait": 0.0, "max_staleness": 0}
    for step in range(start + 1, c.steps + 1):
        totals["staleness_wait"] += index.before_step(step)
        queries = sample_queries(train, run, micro_batch, rng)
        if step <= c.own_block_steps:  # the retriever is frozen: no search, the own block alone (half the reading)
            cand = D.own_blocks(queries)
        else:
            _, cand = retrieve(model, index, run, queries, k)
        staleness = index_staleness(step, index.checkpoint_step, c.freeze_retriever_steps)
        totals["max_staleness"] = max(totals["max_staleness"], staleness)
        batch = D.collate_realm(queries, cand, run.store, run.vocab, cfg.model.reader_max_len).to(run.device)
        out = engine(batch, train_retriever=step > c.freeze_retriever_steps, retriever_signal=c.retriever_signal)
        norm = engine.step(out["loss"])
        window["tokens"] += int(batch.reader_mask.sum() + batch.query_mask.sum())
        window["examples"] += len(queries)
        if log is not None and (step % c.log_every == 0 or step == c.steps):
            seconds = time.perf_counter() - window["t"]
            m = batch_metrics(out, batch)
            gold = gold_in_topk(queries, cand)
            span_in_k = D.span_in_candidates(queries, cand, run.store)
            log.log(step, loss=out["loss"].item(), **m, gold_in_topk=gold, span_in_topk=span_in_k, grad_norm=norm,
                    index_version=index.version, staleness=staleness, tokens_per_s=window["tokens"] * world / seconds,
                    examples_per_s=window["examples"] * world / seconds, **index.stats,
                    refresh_blocked_s=totals["refresh_blocked"], staleness_wait_s=totals["staleness_wait"],
                    elapsed=time.time() - t_start)
            print(f"pretrain step {step}/{c.steps} loss {out['loss'].item():.3f} mlm acc {m['mlm_accuracy']:.2f} "
                  f"p(null) {m['p_null']:.2f} entropy {m['retrieval_entropy']:.2f} span@k {span_in_k:.2f} "
                  f"gold@k {'-' if gold is None else f'{gold:.2f}'} index v{index.version} staleness {staleness}",
                  flush=True)
            window = {"t": time.perf_counter(), "tokens": 0, "examples": 0}
        totals["refresh_blocked"] += index.after_step(model, step)
        if step % c.checkpoint_every == 0 and step < c.steps:
            save_training_state(engine, run.dir / "checkpoints", step, _client_state(step, run_id, rng), rank,
                                c.keep_checkpoints)
    wall = time.time() - t_start
    if rank == 0:
        save_model(model, run.dir / "models" / "realm", step=c.steps,
                   extra={"doc_encoder_id": f"{run_id}-{c.steps}", "stage": "realm", "init": init})
    return {"start_step": start, "steps": c.steps - start, "seconds": wall, **totals,
            "stall_fraction": (totals["refresh_blocked"] + totals["staleness_wait"]) / max(wall, 1e-9)}


def _client_state(step: int, run_id: str, rng: np.random.Generator) -> dict:
    """Per-rank generator states gathered on every rank (each rank restores its own)."""
    states = [rng.bit_generator.state]
    torch_states = [torch.get_rng_state()]
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        states = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(states, rng.bit_generator.state)
        torch_states = [None] * len(states)
        torch.distributed.all_gather_object(torch_states, torch.get_rng_state())
    return {"step": step, "run_id": run_id, "numpy_rng": states, "torch_rng": torch_states}


def pretrain(cfg: Config) -> dict:
    """`launch.py pretrain`: one process here, or the Ray actors of cluster/ (cluster.backend)."""
    if cfg.cluster.backend == "ray":
        from cluster.run import pretrain_on_ray

        return pretrain_on_ray(cfg)
    if cfg.refresh.mode != "sync":
        print("note: cluster.backend=local refreshes stop-the-world (refresh.mode=async needs "
              "cluster.backend=ray)", file=sys.stderr)
    run = Run.open(cfg)
    check_k(cfg.retrieval.k, run.store, "retrieval.k")
    torch.manual_seed(cfg.seed)
    model, meta = initial_model(run)
    model.to(run.device).train()
    from trainer.engine import TorchEngine

    engine = TorchEngine(build_optimizer_groups(model, cfg), cfg.pretrain.steps, cfg.pretrain.warmup_steps,
                         cfg.pretrain.grad_clip, model=model)
    log = MetricsLogger(run.dir, "pretrain", cfg)
    try:
        summary = train_loop(run, model, engine, lambda m, run_id, step: StopTheWorldIndex(
            run, m, run_id, step, meta.get("doc_encoder_id", "")),
            log, init=meta.get("stage", ""))
    finally:
        log.close()
    print(f"pretrain: {summary['steps']} steps in {summary['seconds']:.1f} s; blocked by refresh "
          f"{summary['refresh_blocked']:.1f} s ({100 * summary['stall_fraction']:.1f}% of wall time)")
    return summary
