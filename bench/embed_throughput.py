"""Doc-encoder embedding throughput (the index refresh's hot loop) over fixed-length blocks.

Variants side by side in one run, each at several batch sizes: fp32 vs bf16 autocast vs bf16
weights (CUDA only), eager vs SDPA attention, torch.compile off / on. Every row is compared with the fp32 / eager /
no-compile baseline at the same batch size, and with that baseline at the first batch size.

    python bench/embed_throughput.py              # GPU: BERT-base shape; CPU: a small shape (~1 min)
    python bench/embed_throughput.py --smoke      # tiny shapes, seconds (CI)
"""
from __future__ import annotations

import argparse
import copy
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench.common  # noqa: E402,F401  first: --threads must reach BLAS/OpenMP before numpy and torch load

# isort: split
import torch  # noqa: E402

from bench.common import (  # noqa: E402
    add_common_args,
    apply_common_args,
    bert_encoder_flops,
    int_list,
    mfu,
    peak_bf16_flops,
    print_table,
    time_fn,
    write_results,
)
from trainer.bert import init_bert  # noqa: E402
from trainer.model import Tower  # noqa: E402

VOCAB = 30522  # the uncased BERT / MiniLM vocabulary the project tokenizes with


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.add_argument("--init", default="random", help="random (shape from the flags) | minilm (the shipped weights)")
    p.add_argument("--layers", type=int, help="encoder layers (default: 12 on GPU, 2 on CPU; minilm: all 6)")
    p.add_argument("--hidden", type=int, help="hidden size (default: 768 on GPU, 256 on CPU)")
    p.add_argument("--heads", type=int, help="attention heads (default: 12 on GPU, 4 on CPU)")
    p.add_argument("--intermediate", type=int, help="FFN size (default: 4 x hidden)")
    p.add_argument("--batch-sizes", type=int_list, help="comma list (default: 32,128,512 on GPU, 8,32 on CPU)")
    p.add_argument("--blocks", type=int, help="blocks encoded per timed repeat (default: 2048 GPU, 64 CPU)")
    p.add_argument("--seq-len", type=int, default=288, help="tokens per block")
    p.add_argument("--dim", type=int, default=128, help="retrieval embedding size (the tower's projection)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per variant (the median is reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed repeats per variant")
    p.add_argument("--compile", action="store_true", help="also run torch.compile variants on CPU")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants (on by default on CUDA)")
    p.add_argument("--compile-batch-sizes", type=int_list,
                   help="batch sizes with compile variants (default: the largest; each one costs a compilation)")
    a = p.parse_args(argv)
    apply_common_args(a)
    gpu = a.device.type == "cuda"
    if a.smoke:  # seconds on two CPU cores; shapes only need to exercise every code path
        a.layers, a.hidden, a.heads, a.intermediate = a.layers or 1, a.hidden or 32, a.heads or 2, a.intermediate or 64
        a.batch_sizes, a.blocks = a.batch_sizes or [2, 4], a.blocks or 8
        a.repeats, a.warmup = 1, 1
    a.layers = a.layers or (0 if a.init != "random" else 12 if gpu else 2)
    a.hidden = a.hidden or (768 if gpu else 256)
    a.heads = a.heads or (12 if gpu else 4)
    a.intermediate = a.intermediate or 4 * a.hidden
    a.batch_sizes = a.batch_sizes or ([32, 128, 512] if gpu else [8, 32])
    a.blocks = a.blocks or (2048 if gpu else 64)
    a.compile_on = not a.no_compile and (gpu or a.compile)
    a.compile_batch_sizes = a.compile_batch_sizes or [max(a.batch_sizes)]
    return a


def variants(a: argparse.Namespace) -> list[dict]:
    """(precision, attention, compile, batch) in table order; the baseline comes first per batch size."""
    # bf16 = autocast over fp32 weights; bf16w = the tower cast to bf16 (LayerNorm, GELU and the
    # residual stream in bf16 too, no per-call casts). CPU bf16 is not our path.
    precisions = ["fp32"] + (["bf16", "bf16w"] if a.device.type == "cuda" else [])
    out = []
    for bs in a.batch_sizes:
        for prec in precisions:
            for attn in ("eager", "sdpa"):
                out.append({"precision": prec, "attn": attn, "compile": False, "batch": bs})
            # Compile only the SDPA model: eager attention is what compile would have to fuse away,
            # and each compilation costs tens of seconds (on CUDA, the bf16 ones only).
            fp32_skip = prec == "fp32" and len(precisions) > 1
            if a.compile_on and bs in a.compile_batch_sizes and not fp32_skip:
                out.append({"precision": prec, "attn": "sdpa", "compile": True, "batch": bs})
    return out


def build_towers(a: argparse.Namespace) -> dict[tuple[str, str], Tower]:
    """One doc tower per (weights dtype, attention implementation), same weights, eval mode."""
    bert = init_bert(a.init, VOCAB, a.layers, a.hidden, a.heads, a.intermediate)
    base = Tower(bert, a.dim).eval().to(a.device)
    towers = {}
    for attn in ("eager", "sdpa"):
        t = copy.deepcopy(base)
        t.encoder.set_attn_implementation(attn)
        towers["fp32", attn] = t
        if a.device.type == "cuda":
            towers["bf16", attn] = copy.deepcopy(t).to(torch.bfloat16)
    return towers


def main(argv: list[str] | None = None) -> list[dict]:
    a = parse_args(argv)
    torch.manual_seed(0)
    if a.compile_on:
        import torch._dynamo.config as dcfg
        # One static graph per batch size (no dynamic-shape graph), and room for all of them.
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(dcfg, name):
                setattr(dcfg, name, max(getattr(dcfg, name), 4 * len(a.batch_sizes)))
    towers = build_towers(a)
    cfg = towers["fp32", "sdpa"].encoder.config  # the real shape (minilm fixes it)
    layers, hidden, inter = cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size
    peak = peak_bf16_flops(a.device)
    compiled: dict[str, torch.nn.Module] = {}

    rows, base_at = [], {}
    for v in variants(a):
        bs = v["batch"]
        n_batches = max(1, math.ceil(a.blocks / bs))
        # Random ids (no special tokens) already on the device: we time the encoder, not the
        # host->device copy; all-ones mask since blocks are packed to full length.
        ids = torch.randint(1000, VOCAB, (n_batches, bs, a.seq_len), device=a.device)
        mask = torch.ones(bs, a.seq_len, dtype=torch.long, device=a.device)
        model: torch.nn.Module = towers["bf16" if v["precision"] == "bf16w" else "fp32", v["attn"]]
        if v["compile"]:
            key = (v["precision"], v["attn"])
            if key not in compiled:
                compiled[key] = torch.compile(model, dynamic=False)
            model = compiled[key]
        autocast = torch.autocast(a.device.type, dtype=torch.bfloat16, enabled=v["precision"] == "bf16")

        @torch.inference_mode()
        def run(model=model, ids=ids, mask=mask, autocast=autocast) -> None:
            with autocast:
                for batch_ids in ids:
                    model(batch_ids, mask).float()

        t = time_fn(run, a.device, a.repeats, a.warmup + (1 if v["compile"] else 0))  # +1: compilation
        blocks = n_batches * bs
        flops = bert_encoder_flops(blocks, a.seq_len, layers, hidden, inter)
        row = {"batch": bs, "precision": v["precision"], "attn": v["attn"], "compile": v["compile"],
               "blocks/s": blocks / t["median"], "ms/batch": 1e3 * t["median"] / n_batches,
               "TFLOP/s": flops / t["median"] / 1e12, "MFU(bf16 peak)": mfu(flops, t["median"], peak)}
        if v["precision"] == "fp32" and v["attn"] == "eager" and not v["compile"]:
            base_at[bs] = row["blocks/s"]
        row["x base(same batch)"] = row["blocks/s"] / base_at[bs]
        row[f"x base(batch {a.batch_sizes[0]})"] = row["blocks/s"] / base_at[a.batch_sizes[0]]
        rows.append(row)
        print(f"  batch {bs:>4} {v['precision']} {v['attn']:<5} compile={v['compile']!s:<5} "
              f"{row['blocks/s']:10.1f} blocks/s", flush=True)

    config = {"init": a.init, "layers": layers, "hidden": hidden, "heads": cfg.num_attention_heads,
              "intermediate": inter, "seq_len": a.seq_len, "blocks/repeat": a.blocks, "repeats": a.repeats,
              "warmup": a.warmup, "smoke": a.smoke}
    notes = [("FLOPs: encoder matmuls only, 2*(4h^2 + 2hI)*tokens + 4*L*h*tokens per layer; MFU vs dense bf16 "
              "peak (fp32 rows too), n/a on CPU or an unknown GPU"),
             ("bf16 = torch.autocast over fp32 weights; bf16w = the tower's weights cast to bf16, no autocast; "
              f"fp32 matmuls at default precision ({torch.get_float32_matmul_precision()})")]
    title = "Doc-encoder embedding throughput"
    print_table(title, rows)
    write_results(title, config, rows, a.results, a.device, notes)
    return rows


if __name__ == "__main__":
    main()
