"""How fast the reader learns to read a block that holds the span, for copy-head settings side by side.

Pre-training's first phase alone (`pretrain.own_block_steps`): each sentence is read with its own block, so
the masked span is always in z and the only thing to learn is reading it. Every variant starts from the run's
ICT model (prepare and ict must have run in `run_dir`) with the same seed, the same sentences in the same order
and the learning-rate schedule set to the probe's length; only the copy head's settings differ
(`model.copy_layer`, `model.copy_init`). Every `--every` steps it scores masked-span accuracy on `--held`
fixed sentences of the held-out examples (prepare's eval split: with `data.eval_split=documents`, articles
pre-training never reads), each read with its own block (or, for a sentence not in the corpus, its gold
block). One table: variant x step, into bench/RESULTS.md.

    python bench/reader_probe.py --config configs/wiki_vital.yaml --steps 120 --variant 0:random --variant 3:identity
    python bench/reader_probe.py --smoke       # a tiny random-init run in a temp dir, seconds (CI)
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import ROOT, add_common_args, apply_common_args, write_results  # noqa: E402

# isort: split
import numpy as np  # noqa: E402
import torch  # noqa: E402

from cluster.config import load_config  # noqa: E402
from core.errors import InputError  # noqa: E402
from trainer import data as D  # noqa: E402
from trainer.config import SMOKE_RUN  # noqa: E402

DEFAULT_VARIANTS = ["0:random", "0:identity", "3:identity"]
SMOKE = [*SMOKE_RUN, "model.reader_layers=2", "pretrain.batch_size=4"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(p)
    p.add_argument("--config", default=str(ROOT / "configs" / "wiki_vital.yaml"))
    p.add_argument("--steps", type=int, default=120, help="own-block steps per variant")
    p.add_argument("--every", type=int, default=20, help="score the held-out sentences every this many steps")
    p.add_argument("--held", type=int, default=64, help="held-out sentences scored")
    p.add_argument("--variant", action="append", help="LAYER:INIT (model.copy_layer:model.copy_init), repeatable; "
                   f"default {' '.join(DEFAULT_VARIANTS)}")
    p.add_argument("overrides", nargs="*", help="dotted.key=value config overrides for every variant")
    return p.parse_args(argv)


def variant_overrides(spec: str) -> list[str]:
    layer, sep, init = spec.partition(":")
    if not sep or not layer.isdigit():
        raise InputError(f"--variant {spec!r}: expected LAYER:INIT, e.g. 3:identity")
    return ["model.reader_head=copy", f"model.copy_layer={layer}", f"model.copy_init={init}"]


def answer_block(q: D.MaskedQuery) -> int:
    """The block a held-out sentence is read with: its own (the article it came from), else its gold block
    (a synthetic evaluation sentence is not in the corpus; the block stating its fact is); -1 for neither."""
    blocks = q.exclude_blocks or q.gold_blocks
    return blocks[0] if blocks else -1


def held_queries(run, n: int, seed: int) -> list[D.MaskedQuery]:
    """n masked held-out sentences that have a block to read, drawn once for every variant."""
    from trainer.pretrain import sample_queries

    examples = D.ExampleTable(run.dir / "examples" / "eval.parquet")
    out = sample_queries(examples, run, n, np.random.default_rng(seed), accept=lambda q: answer_block(q) >= 0,
                         max_tries=50 * n)
    if not out:
        raise InputError(f"{run.dir / 'examples' / 'eval.parquet'}: no held-out sentence with a maskable span "
                         "and a block to read")
    return out


def probe(config: str, overrides: list[str], steps: int, every: int, n_held: int) -> dict[int, float]:
    """Held-out masked-span accuracy (own block) at step 0 and every `every` steps."""
    from trainer.engine import TorchEngine
    from trainer.pretrain import batch_metrics, build_optimizer_groups, sample_queries, setup

    cfg = load_config(config, [*overrides, f"pretrain.steps={steps}", f"pretrain.own_block_steps={steps}",
                               f"pretrain.freeze_retriever_steps={steps}"], "pretrain",
                      ("prepare", "ict", "pretrain", "evaluate"))
    run, model, _ = setup(cfg)
    c = cfg.pretrain
    engine = TorchEngine(build_optimizer_groups(model, cfg), steps, c.warmup_steps, c.grad_clip, model=model)
    train = D.ExampleTable(run.dir / "examples" / "train.parquet")
    held = held_queries(run, n_held, cfg.seed + 1)
    rng = np.random.default_rng(cfg.seed)

    def read(queries, train_step: bool):
        blocks = np.array([[answer_block(q)] for q in queries], np.int64)
        batch = D.collate_realm(queries, blocks, run.store, run.vocab, cfg.model.reader_max_len).to(run.device)
        out = engine(batch, train_retriever=False, retriever_signal=c.retriever_signal)
        if train_step:
            engine.step(out["loss"])
        return batch_metrics(out, batch)["mlm_accuracy"]

    def score() -> float:
        model.eval()
        with torch.no_grad():
            right = sum(read(held[i:i + 16], False) * len(held[i:i + 16]) for i in range(0, len(held), 16))
        model.train()
        return right / len(held)

    curve = {0: score()}
    for step in range(1, steps + 1):
        read(sample_queries(train, run, c.batch_size, rng), True)
        if step % every == 0 or step == steps:
            curve[step] = score()
            print(f"step {step}: held-out accuracy, span in z {curve[step]:.3f}", flush=True)
    return curve


def main(argv=None) -> list[dict]:
    a = parse_args(argv)
    apply_common_args(a)
    variants = a.variant or (["0:random", "1:identity"] if a.smoke else DEFAULT_VARIANTS)
    steps, every, n_held = (4, 2, 8) if a.smoke else (a.steps, a.every, a.held)
    base = ["cluster.backend=local", "refresh.mode=sync", f"device={a.device.type}", *a.overrides]
    if a.threads:
        base.append(f"threads={a.threads}")
    work = None
    if a.smoke:  # its own tiny run: the synthetic corpus, a random 2-layer reader
        from trainer.ict import ict
        from trainer.prepare import prepare

        work = Path(tempfile.mkdtemp(prefix="reader-probe-"))
        a.config = str(ROOT / "configs" / "tiny.yaml")
        base = [*SMOKE, *base, f"run_dir={work / 'run'}"]
        cfg = load_config(a.config, base)
        prepare(cfg)
        ict(cfg)
    rows = []
    try:
        for spec in variants:
            print(f"== {spec} ==", flush=True)
            t0 = time.perf_counter()
            curve = probe(a.config, [*base, *variant_overrides(spec)], steps, every, n_held)
            layer, _, init = spec.partition(":")
            rows.append({"copy_layer": layer, "copy_init": init, **{f"step {s}": acc for s, acc in curve.items()},
                         "wall s": time.perf_counter() - t0})
    finally:
        if work:
            shutil.rmtree(work, ignore_errors=True)
    config = {"config": Path(a.config).name, "own-block steps": steps, "held-out sentences": n_held,
              "smoke": a.smoke, "overrides": " ".join(a.overrides) or "-"}
    notes = ["every variant: the run's ICT model, the same seed, sentences and schedule; only the copy head differs",
             "accuracy: every masked wordpiece of the span right, each held-out sentence read with its own block "
             "(or its gold block)",
             "copy_layer 0 = the reader's last layer"]
    write_results("Reader probe: own-block reading by copy-head setting", config, rows, a.results, None, notes)
    return rows


if __name__ == "__main__":
    main()
