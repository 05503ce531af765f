#!/usr/bin/env python
"""Single-node entry point: python launch.py <command> [--config configs/NAME.yaml] [dotted.key=value ...]

Commands: prepare | ict | pretrain | finetune | evaluate | query | explain | update-corpus | reindex | serve | report.
Every command reads from and writes into the config's run_dir (evaluate task=openqa scores exact match; query
question="..."; explain question="..." or text="..." answer="..."; update-corpus changes=FILE edits the
corpus and its index without training; reindex data.corpus=NEW embeds a new corpus with the trained
encoders; serve runs the QA model as an HTTP service on Ray Serve until interrupted; `report [RUN_DIR]` plots
events.jsonl to RUN_DIR/report/*.png).
A command's result goes to stdout (one JSON object; query, explain: readable text, --json for one), progress to
stderr. Bad input exits with status 2 and one line naming the file:line or key. An override the
command does not read is bad input (the error names the commands that read it); a script that
passes one set of overrides to several commands names them all with --pipeline, and each command
then skips the keys another of them reads.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from core.env import set_offline_env

set_offline_env()  # before transformers is imported anywhere: nothing is ever downloaded at run time

COMMANDS = ("prepare", "ict", "pretrain", "finetune", "evaluate", "query", "explain", "update-corpus", "reindex",
            "serve", "report")
DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "tiny.yaml")


def run_command(command: str, cfg) -> dict | None:
    """The command's body, on the backend the config chooses; returns its result (serve: None, it prints its
    URL itself once it answers and runs until interrupted)."""
    if command == "serve":
        from cluster.serve import serve_forever

        return serve_forever(cfg)
    if command == "pretrain" and cfg.cluster.backend == "ray":
        from cluster.run import pretrain_on_ray

        return pretrain_on_ray(cfg)
    if command == "prepare" and cfg.prepare.engine == "ray":
        from cluster.prepare_data import prepare_on_ray

        return prepare_on_ray(cfg)
    if command == "prepare":
        from trainer.prepare import prepare

        return prepare(cfg)
    if command == "ict":
        from trainer.ict import ict

        return ict(cfg)
    if command == "pretrain":
        from trainer.pretrain import pretrain

        return pretrain(cfg)
    if command == "finetune":
        from trainer.finetune import finetune

        return finetune(cfg)
    if command == "evaluate":
        from trainer.evaluate import evaluate

        return evaluate(cfg)
    if command in ("update-corpus", "reindex"):
        from trainer.corpus_edits import reindex, update_corpus

        return update_corpus(cfg) if command == "update-corpus" else reindex(cfg)
    if command == "explain":
        from trainer.explain import explain

        return explain(cfg)
    from trainer.qa_system import query

    return query(cfg)


def print_result(command: str, result: dict, as_json: bool) -> None:
    if command == "query" and not as_json:
        print(f"Q: {result['question']}\nA: {result['answer']}\n")
        for i, blk in enumerate(result["blocks"], 1):
            print(f"{i}. [{blk['score']:.2f}] {blk['title']}\n   {blk['snippet']}")
        print(f"\n(load {result['load_seconds']} s, query {result['query_seconds']} s)", file=sys.stderr)
    elif command == "explain" and not as_json:
        print_explanation(result)
    elif command == "evaluate":
        print(json.dumps(result, indent=2))
    else:
        print(json.dumps({k: v for k, v in result.items() if k != "refresh_history"}), flush=True)


def _p(p: float | None) -> str:
    return "-" if p is None else f"{p:.3g}"


def print_explanation(result: dict) -> None:
    """`explain` as text: the prediction, then one row a block (the null document last, in text= mode)."""
    if "question" in result:
        print(f"Q: {result['question']}\nA: {result['prediction']}   p(y|x) {_p(result['probability'])}")
    else:
        verdict = "right" if result["correct"] else f"wrong; p(answer|x) {_p(result['answer_probability'])}"
        print(f"x: {result['masked_text']}\nA: {result['prediction']}   p(y|x) {_p(result['probability'])} "
              f"({verdict}: {result['answer']!r})")
    print("\n    p(z|x)  p(y|z,x)  share   without it: answer (p)")
    for i, blk in enumerate(result["blocks"], 1):
        w = blk["without"]
        without = "no candidate left" if w["prediction"] is None else f"{w['prediction']!r} ({_p(w['probability'])})"
        print(f"{i:2d}. {_p(blk['p_z']):>6}  {_p(blk['p_y_given_z']):>8}  {blk['share']:.3f}   {without}")
        name = blk["title"]
        if blk["block_id"] is not None:
            name = f"block {blk['block_id']} (doc {blk['doc_id']}): {name}"
        print(f"    {name}" + (f"\n    {blk['evidence']}" if blk["evidence"] else ""))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=COMMANDS)
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="YAML config (default: configs/tiny.yaml)")
    parser.add_argument("--json", action="store_true", help="query, explain: print one JSON object")
    parser.add_argument("--pipeline", default="", metavar="CMD,CMD,...",
                        help="the overrides are shared by these commands: skip the keys only another of them reads")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    args = parser.parse_intermixed_args(argv)  # options may follow the command or the overrides

    from cluster.config import load_config
    from core.errors import InputError
    from core.logs import setup_logging

    setup_logging()
    pipeline = tuple(c.strip() for c in args.pipeline.split(",") if c.strip())
    unknown = [c for c in pipeline if c not in COMMANDS]
    if unknown:
        print(f"error: --pipeline: unknown command '{unknown[0]}'; commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    try:
        if args.command == "report":
            from trainer.report import report

            run_dirs = [o for o in args.overrides if "=" not in o]
            cfg = load_config(args.config, [o for o in args.overrides if "=" in o], "report", pipeline)
            for path in report(run_dirs[0] if run_dirs else cfg.run_dir).values():
                print(f"report: {path}")
            return 0
        cfg = load_config(args.config, args.overrides, args.command, pipeline)
        result = run_command(args.command, cfg)
        if result is not None:
            print_result(args.command, result, args.json)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk, a read-only or missing directory: the environment, not the input
        where = e.filename or (cfg.run_dir if "cfg" in locals() else "")
        print(f"error: {where}: {e.strerror or e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
