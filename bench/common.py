"""Shared pieces of the benchmarks: machine info, timing, FLOP counting, RESULTS.md writing.

Every benchmark prints its table and prepends it (newest first) to a results file together with
the machine, the commit and the configuration, so numbers are never quoted without context.
"""
from __future__ import annotations

import datetime as _dt
import math
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from core.env import set_offline_env  # noqa: E402

set_offline_env()  # benchmarks never reach a model hub


def _threads_from_argv(argv: list[str]) -> None:
    """Apply a script's --threads (or --smoke's 1) to OpenMP / BLAS pools, which size themselves when
    numpy, torch and faiss load: numpy's matmul must get the same cores as faiss and torch."""
    n = None
    for i, arg in enumerate(argv):
        if arg == "--threads" and i + 1 < len(argv):
            n = argv[i + 1]
        elif arg.startswith("--threads="):
            n = arg.split("=", 1)[1]
    if n is None and "--smoke" in argv:
        n = "1"
    if n and n.isdigit() and int(n) > 0:
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = n


if Path(sys.argv[0]).resolve().parent == Path(__file__).resolve().parent:  # run as python bench/NAME.py
    _threads_from_argv(sys.argv[1:])

import torch  # noqa: E402

RESULTS_HEADER = ("# Benchmark results\n\n"
                  "Newest first. Written by `bench/*.py` (see bench/README.md); do not edit by hand.\n")

# Dense bf16 tensor-core peak (no sparsity), FLOP/s; matched against torch.cuda.get_device_name().
# Order matters: the first matching pattern wins (PCIe before the generic name).
PEAK_BF16_FLOPS: list[tuple[str, float]] = [
    (r"H100.*PCIe", 756e12),
    (r"H100", 989e12),   # SXM
    (r"H200", 989e12),   # SXM; same compute die as H100 SXM
    (r"GH200", 989e12),
    (r"A100", 312e12),
    (r"L40S", 362e12),
    (r"L4\b", 121e12),
    (r"A10G?\b", 125e12),
]


# ---- machine / run info ----------------------------------------------------------------------

def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], check=False, cwd=ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def commit_info() -> str:
    """Short commit hash, "+dirty" when the tree has uncommitted changes (the numbers may not match it).
    BENCH_COMMIT names it where the tree travels without .git (a copy on a GPU machine)."""
    if os.environ.get("BENCH_COMMIT"):
        return os.environ["BENCH_COMMIT"] + " (BENCH_COMMIT)"
    rev = _git("rev-parse", "--short", "HEAD") or "no-commit"
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    return rev + ("+dirty" if dirty else "")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_name(device: torch.device | None = None) -> str | None:
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_name(device if device is not None and device.type == "cuda" else 0)


def machine_info(device: torch.device | None = None) -> dict[str, str]:
    info = {
        "date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": commit_info(),
        "cpu": f"{cpu_model()} ({os.cpu_count()} logical cores, torch threads {torch.get_num_threads()})",
        "gpu": gpu_name(device) or "none",
        "python": platform.python_version(),
        "torch": torch.__version__ + (f" (CUDA {torch.version.cuda})" if torch.version.cuda else ""),
    }
    try:
        import transformers
        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    try:
        import faiss
        info["faiss"] = getattr(faiss, "__version__", "?")
    except ImportError:
        info["faiss"] = "not installed"
    if device is not None:
        info["device"] = str(device)
    return info


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: CUDA is not available on this machine")
    return torch.device(name)


def add_common_args(p, results_default: str | os.PathLike = ROOT / "bench" / "RESULTS.md") -> None:
    """--device, --threads, --smoke, --results: the flags every benchmark takes."""
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads for torch and faiss (default: their own; --smoke: 1, robust on a busy machine)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, one repeat, seconds: checks the script runs (CI)")
    p.add_argument("--results", default=str(results_default), help="markdown file the results section is prepended to")


def apply_common_args(a) -> None:
    """Resolve --device and --threads in place (call right after parse_args)."""
    a.device = pick_device(a.device)
    if a.smoke and not a.threads:
        # Two spinning OpenMP threads on a shared 2-core machine can run 50x slower than one.
        a.threads = 1
    if a.threads > 0:
        torch.set_num_threads(a.threads)
        try:
            import faiss
            faiss.omp_set_num_threads(a.threads)
        except ImportError:
            pass


def count(s: str) -> int:
    """argparse type for a count written as 1000000 or 1e6."""
    return int(float(s))


def int_list(s: str) -> list[int]:
    """argparse type for "8,32,128" (also accepts 1e4-style numbers)."""
    return [int(float(x)) for x in s.split(",") if x.strip()]


# ---- timing ----------------------------------------------------------------------------------

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], object], device: torch.device, repeats: int = 5, warmup: int = 1) -> dict[str, float]:
    """Median / min seconds of `fn()` over `repeats` runs after `warmup` untimed runs.

    On CUDA each run is bracketed by CUDA events and the device is synchronized, so asynchronous
    kernel launches are not mistaken for finished work; the median is robust to stray hiccups.
    """
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(max(1, repeats)):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return {"median": statistics.median(times), "min": min(times), "n": len(times)}


class SegmentTimer:
    """Times named parts of one step without synchronizing between them on CUDA.

    CUDA events are recorded on the stream and read after one synchronize at the end of the step,
    so the timer does not stall the launch queue and distort the parts it measures.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self._marks: list[tuple[str, object, object]] = []

    @contextmanager
    def segment(self, name: str) -> Iterator[None]:
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._marks.append((name, start, end))
        else:
            t0 = time.perf_counter()
            yield
            self._marks.append((name, t0, time.perf_counter()))

    def collect(self) -> dict[str, float]:
        """Seconds per segment name (summed when a name repeats); resets the timer."""
        sync(self.device)
        out: dict[str, float] = {}
        for name, a, b in self._marks:
            dt = a.elapsed_time(b) / 1e3 if self.device.type == "cuda" else b - a
            out[name] = out.get(name, 0.0) + dt
        self._marks = []
        return out


# ---- FLOPs -----------------------------------------------------------------------------------

def bert_layer_flops_per_token(seq_len: int, hidden: int, intermediate: int) -> int:
    """Matmul FLOPs (2 per multiply-add) of one BERT encoder layer's forward, per token.

    Q, K, V projections 3 * 2h^2 = 6h^2; attention output projection 2h^2; FFN up + down
    2 * 2hI (= 16h^2 when I = 4h); attention scores Q K^T 2Lh and probabilities x V 2Lh, i.e.
    4Lh per token. With I = 4h this is 24h^2 + 4Lh. Softmax, layer norms, GELU and biases are
    ignored (a few percent at most); so are the embeddings (a lookup).
    """
    h, inter, L = hidden, intermediate, seq_len
    return 6 * h * h + 2 * h * h + 4 * h * inter + 4 * L * h


def bert_encoder_flops(num_seqs: int, seq_len: int, layers: int, hidden: int, intermediate: int) -> int:
    """Forward matmul FLOPs of a BERT encoder over `num_seqs` sequences of `seq_len` tokens (padding included)."""
    return num_seqs * seq_len * layers * bert_layer_flops_per_token(seq_len, hidden, intermediate)


def peak_bf16_flops(device: torch.device) -> float | None:
    """Dense bf16 peak of the GPU, or None (CPU, unknown GPU): MFU is then reported as n/a."""
    if device.type != "cuda":
        return None
    name = gpu_name(device) or ""
    for pattern, peak in PEAK_BF16_FLOPS:
        if re.search(pattern, name):
            return peak
    return None


def mfu(flops: float, seconds: float, peak: float | None) -> float | None:
    if peak is None or seconds <= 0:
        return None
    return flops / seconds / peak


# ---- results ---------------------------------------------------------------------------------

def fmt(v: object) -> str:
    """Table cell: None -> n/a, floats with 3-4 significant digits, everything else str()."""
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if math.isnan(v) or math.isinf(v):
            return str(v)
        if v == 0:
            return "0"
        a = abs(v)
        if a >= 1000:
            return f"{v:,.0f}"
        if a >= 100:
            return f"{v:.1f}"
        if a >= 1:
            return f"{v:.2f}"
        return f"{v:.3g}"
    return str(v)


def markdown_table(rows: list[dict]) -> str:
    cols: list[str] = []
    for r in rows:
        cols += [c for c in r if c not in cols]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join(" --- " for _ in cols) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(c, "")) if c in r else "" for c in cols) + " |")
    return "\n".join(lines)


def split_header(text: str, default: str) -> tuple[str, str]:
    """(header, sections) of a results file: its `# ` title and introduction, else `default` over all of it."""
    if not text.startswith("# "):
        return default, text
    cut = text.find("\n## ")
    return (text, "") if cut < 0 else (text[:cut + 1], text[cut + 1:])


def write_results(title: str, config: dict, rows: list[dict], path: str | os.PathLike = ROOT / "bench" / "RESULTS.md",
                  device: torch.device | None = None, notes: list[str] | None = None, header: str = RESULTS_HEADER,
                  command: str | None = None) -> str:
    """Prepend one section (machine, commit, date, configuration, table) to `path`; returns the section.

    Newest first, so the file reads as a log whose top is the current state. `header` opens a new file; an
    existing file keeps its own (the text before its first `## ` section), so two scripts writing one file, or
    a hand-edited introduction, never stack or replace headings. `command` defaults to this script's command line.
    """
    info = machine_info(device)
    cmd = command or "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:])
    lines = [f"## {title} — {info['date']}", ""]
    lines += [f"- {k}: {v}" for k, v in info.items() if k != "date"]
    lines.append(f"- command: `{cmd}`")
    lines.append("- config: " + ", ".join(f"{k}={fmt(v) if isinstance(v, float) else v}" for k, v in config.items()))
    lines += [f"- note: {n}" for n in notes or []]
    section = "\n".join(lines) + "\n\n" + markdown_table(rows) + "\n"

    p = Path(path)
    head, body = split_header(p.read_text() if p.is_file() else "", header)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(head.rstrip("\n") + "\n\n" + section + ("\n" + body.lstrip("\n") if body.strip() else ""))
    os.replace(tmp, p)  # a reader never sees half a file
    return section


def print_table(title: str, rows: list[dict]) -> None:
    print(f"\n{title}\n")
    print(markdown_table(rows), flush=True)
