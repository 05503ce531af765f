#!/usr/bin/env python
"""Single-node entry point: python launch.py <command> [--config configs/NAME.yaml] [dotted.key=value ...]

Commands: prepare | ict | pretrain | finetune | evaluate | query | report. Every command reads
from and writes into the config's run_dir (evaluate task=openqa scores exact match; query
question="..."; `report [RUN_DIR]` plots events.jsonl to RUN_DIR/report/*.png).
Bad input exits with status 2 and one line naming the file:line or key.
"""
from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever downloaded at run time
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # per-file weight-loading bars in every actor

COMMANDS = ("prepare", "ict", "pretrain", "finetune", "evaluate", "query", "report")
DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "tiny.yaml")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=COMMANDS)
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="YAML config (default: configs/tiny.yaml)")
    parser.add_argument("--json", action="store_true", help="query: print one JSON object")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    args = parser.parse_intermixed_args(argv)  # options may follow the command or the overrides

    from indexer.io import InputError
    from trainer.config import load_config

    try:
        if args.command == "report":
            from trainer.report import report

            run_dirs = [o for o in args.overrides if "=" not in o]
            cfg = load_config(args.config, [o for o in args.overrides if "=" in o])
            report(run_dirs[0] if run_dirs else cfg.run_dir)
            return 0
        cfg = load_config(args.config, args.overrides)
        from trainer import finetune, loop, pretrain

        if args.command == "pretrain":
            pretrain.pretrain(cfg)
        elif args.command == "finetune":
            finetune.finetune(cfg)
        elif args.command == "query":
            finetune.query(cfg, as_json=args.json)
        elif args.command == "evaluate" and cfg.task == "openqa":
            finetune.evaluate_openqa(cfg)
        else:
            getattr(loop, args.command)(cfg)
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
