"""REALM pre-training: one loop for the single process and for every DeepSpeed rank in Ray.

What differs between the two paths is passed in, never branched on inside the loop:
  * `engine`: an `Engine` (trainer/engine.py): `TorchEngine` here, `DeepSpeedEngine` in the actors;
  * `index`: an `IndexClient` (trainer/index_client.py): `StopTheWorldIndex` refreshes in this
    process and blocks; `cluster.actors.ServiceIndex` asks the shard service and only publishes
    the doc encoder for the embedding workers. Their `before_step`/`after_step` seconds are what
    the stall figures count.
`launch.py pretrain` runs `pretrain` here with `cluster.backend=local` and
`cluster.run.pretrain_on_ray` with `cluster.backend=ray`; both start from `setup`.

Resume: the training state (model, optimizer, scheduler, the numpy generator that draws the
examples and masks, i.e. the data position, and torch's RNG) is saved every
`pretrain.checkpoint_every` steps under checkpoints/step_N; `pretrain.resume=true` continues
from the newest complete one.
"""
from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Sequence

import numpy as np
import torch

from core.errors import InputError
from core.files import atomic_write_json
from trainer import data as D
from trainer.checkpoint import latest_training_state, save_model, save_training_state
from trainer.config import TrainConfig
from trainer.engine import Engine, TorchEngine, param_groups
from trainer.index_client import IndexClient, StopTheWorldIndex, index_staleness, refresh_due, retrieve
from trainer.metrics import MetricsLogger
from trainer.model import REALM, marginal_token_log_probs, spans_correct
from trainer.model_init import initial_model
from trainer.run import Run, check_k

log = logging.getLogger(__name__)


FRESH_HEADS = ("reader.mlm_head", "reader.copy_head", "null_score")  # parameter-name prefixes trained at head_lr


def build_optimizer_groups(model, cfg: TrainConfig) -> list[dict]:
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


def sample_queries(examples: Sequence[D.Example], run: Run, n: int, rng: np.random.Generator,
                   accept: Callable[[D.MaskedQuery], bool] | None = None,
                   max_tries: int | None = None) -> list[D.MaskedQuery]:
    """n masked queries from random examples (only those `accept` passes). With `max_tries`, at most that
    many draws, so the list can come back short; without it, draws until it has n."""
    out, tries = [], 0
    while len(out) < n and (max_tries is None or tries < max_tries):
        tries += 1
        q = D.mask_example(examples[int(rng.integers(len(examples)))], run.tok, run.vocab,
                           run.cfg.model.query_max_len, rng, run.cfg.masking.mode, run.cfg.masking.random_span_max,
                           mask_given=False)
        if q is not None and (accept is None or accept(q)):
            out.append(q)
    return out


def restore(engine: Engine, cfg: TrainConfig, run: Run) -> dict | None:
    """The client state of the newest complete training checkpoint, its weights loaded; None = fresh."""
    if not cfg.pretrain.resume:
        return None
    path = latest_training_state(run.dir / "checkpoints")
    if path is None:
        log.warning("resume: no complete checkpoint under %s; starting at step 0", run.dir / "checkpoints")
        return None
    state = engine.load(path)
    log.info("resume: continuing from %s (step %d)", path, state["step"])
    return state


def train_loop(run: Run, model: REALM, engine: Engine, make_index: Callable[[REALM, str, int], IndexClient],
               metrics: MetricsLogger | None, rank: int = 0, world: int = 1, init: str = "") -> dict:
    """The pre-training steps, from a fresh start or a checkpoint. `make_index(model, run_id,
    start_step)` builds the index client once the start step is known. Returns a summary."""
    cfg, c, k = run.cfg, run.cfg.pretrain, run.cfg.retrieval.k
    micro_batch = c.batch_size // world
    train = D.ExampleTable(run.dir / "examples" / "train.parquet")  # memory-mapped: any number of examples
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
    totals = {"refresh_blocked": 0.0, "staleness_wait": 0.0, "max_staleness": 0, "refreshes": 0}
    for step in range(start + 1, c.steps + 1):
        totals["staleness_wait"] += index.before_step(step)
        queries = sample_queries(train, run, micro_batch, rng)
        if step <= c.own_block_steps:  # the retriever is frozen: no search, the own block alone (half the reading)
            cand = D.own_blocks(queries)
        else:
            cand = retrieve(model, index, run, queries, k)
        staleness = index_staleness(step, index.checkpoint_step, c.freeze_retriever_steps)
        totals["max_staleness"] = max(totals["max_staleness"], staleness)
        batch = D.collate_realm(queries, cand, run.store, run.vocab, cfg.model.reader_max_len).to(run.device)
        out = engine(batch, train_retriever=step > c.freeze_retriever_steps, retriever_signal=c.retriever_signal)
        norm = engine.step(out["loss"])
        window["tokens"] += int(batch.reader_mask.sum() + batch.query_mask.sum())
        window["examples"] += len(queries)
        if metrics is not None and (step % c.log_every == 0 or step == c.steps):
            seconds = time.perf_counter() - window["t"]
            m = batch_metrics(out, batch)
            gold = gold_in_topk(queries, cand)
            span_in_k = D.span_in_candidates(queries, cand, run.store)
            metrics.log(step, loss=out["loss"].item(), **m, gold_in_topk=gold, span_in_topk=span_in_k, grad_norm=norm,
                    index_version=index.version, staleness=staleness, tokens_per_s=window["tokens"] * world / seconds,
                    examples_per_s=window["examples"] * world / seconds, **index.stats,
                    refresh_blocked_s=totals["refresh_blocked"], staleness_wait_s=totals["staleness_wait"],
                    elapsed=time.time() - t_start)
            log.info("pretrain step %d/%d loss %.3f mlm acc %.2f p(null) %.2f entropy %.2f span@k %.2f gold@k %s "
                     "index v%d staleness %d", step, c.steps, out["loss"].item(), m["mlm_accuracy"], m["p_null"],
                     m["retrieval_entropy"], span_in_k, "-" if gold is None else f"{gold:.2f}", index.version,
                     staleness)
            window = {"t": time.perf_counter(), "tokens": 0, "examples": 0}
        totals["refresh_blocked"] += index.after_step(model, step)
        totals["refreshes"] += refresh_due(step, cfg.refresh.every_steps, c.steps, c.freeze_retriever_steps)
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


def setup(cfg: TrainConfig) -> tuple[Run, REALM, dict]:
    """What every pre-training process starts from: the run, the initial model (ICT's, else fresh) in
    training mode on the run's device, and that model's metadata."""
    run = Run.open(cfg)
    check_k(cfg.retrieval.k, run.store, "retrieval.k")
    torch.manual_seed(cfg.seed)
    model, meta = initial_model(run)
    model.to(run.device).train()
    return run, model, meta


def pretrain(cfg: TrainConfig) -> dict:
    """Pre-training in this process: TorchEngine and a stop-the-world refresh (`cluster.backend=local`)."""
    if cfg.refresh.mode != "sync":
        log.info("cluster.backend=local refreshes stop-the-world (refresh.mode=async needs cluster.backend=ray)")
    run, model, meta = setup(cfg)
    engine = TorchEngine(build_optimizer_groups(model, cfg), cfg.pretrain.steps, cfg.pretrain.warmup_steps,
                         cfg.pretrain.grad_clip, model=model)
    metrics = MetricsLogger(run.dir, "pretrain", cfg)
    try:
        summary = train_loop(run, model, engine, lambda m, run_id, step: StopTheWorldIndex(
            run, m, run_id, step, meta.get("doc_encoder_id", "")),
            metrics, init=meta.get("stage", ""))
    finally:
        metrics.close()
    # the same file the Ray path writes (cluster/run.py), so benchmarks read one place for either backend
    atomic_write_json(run.dir / "pretrain_summary.json", {**summary, "refresh_mode": "stop-the-world",
                                                          "wall_seconds": summary["seconds"]})
    log.info("pretrain: %d steps in %.1f s; blocked by refresh %.1f s (%.1f%% of wall time)", summary["steps"],
             summary["seconds"], summary["refresh_blocked"], 100 * summary["stall_fraction"])
    return summary
