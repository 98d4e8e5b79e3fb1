"""Shared plumbing for the experiment scripts: arguments, output folder, tables, order fits, figures, checks."""
from __future__ import annotations

import argparse
import csv
import math
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

HERE = Path(__file__).resolve().parent


def make_parser(name: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m experiments.{name}", description=description,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default=str(HERE / "out" / name), help="output folder (tables, CSVs, figures)")
    p.add_argument("--quick", action="store_true",
                   help="small CI-sized run that also asserts the experiment's key conclusions")
    p.add_argument("--seed", type=int, default=0, help="seed of every generator")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (1 is fastest for these small tensors, and far faster on a busy CPU)")
    return p


def parse_and_run(parser: argparse.ArgumentParser, run, argv=None):
    """Parse ``argv`` and call ``run(args)`` with ``--threads`` torch intra-op threads; return its result."""
    args = parser.parse_args(argv)
    with torch_threads(args.threads):
        return run(args)


class torch_threads:
    """Context manager: run with ``n`` torch intra-op threads, restore the previous number afterwards."""

    def __init__(self, n: int):
        self.n = int(n)

    def __enter__(self):
        import torch
        self.prev = torch.get_num_threads()
        if self.n > 0:
            torch.set_num_threads(self.n)
        return self

    def __exit__(self, *exc):
        import torch
        torch.set_num_threads(self.prev)
        return False


def prepare_out(path) -> Path:
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    return out


def progress(iterable, desc: str, enabled: bool = True, total: Optional[int] = None):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm
    return tqdm(iterable, desc=desc, total=total, leave=False)


# ------------------------------------------------------------------------------------------------- numbers
def fmt(v: Any, digits: int = 3) -> str:
    """Compact formatting for tables: ints as they are, floats with ``digits`` significant digits."""
    if v is None:
        return ""
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else "no"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        v = float(v)
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        if v == 0:
            return "0"
        if 1e-3 <= abs(v) < 1e5:
            return f"{v:.{digits}g}"
        return f"{v:.{max(digits - 1, 1)}e}"
    return str(v)


def fit_order(h: Sequence[float], err: Sequence[float], floor: float = 0.0) -> float:
    """Least-squares slope of log(err) against log(h) over the points with finite err > floor (nan if < 2 points).

    With h a step size (or grid spacing) the slope is the convergence order; with h = NFE it is minus the order.
    """
    h = np.asarray(h, dtype=float)
    e = np.asarray(err, dtype=float)
    keep = np.isfinite(e) & (e > floor) & np.isfinite(h) & (h > 0)
    if keep.sum() < 2:
        return math.nan
    return float(np.polyfit(np.log(h[keep]), np.log(e[keep]), 1)[0])


# ------------------------------------------------------------------------------------------------- tables
class Table:
    """Rows of dicts with fixed columns; renders markdown and CSV."""

    def __init__(self, name: str, columns: Sequence[str], title: str = ""):
        self.name = name
        self.columns = list(columns)
        self.title = title
        self.rows: List[Dict[str, Any]] = []

    def add(self, **row):
        unknown = set(row) - set(self.columns)
        if unknown:
            raise KeyError(f"table {self.name}: unknown columns {sorted(unknown)}")
        self.rows.append(row)

    def column(self, name: str, **where) -> List[Any]:
        return [r.get(name) for r in self.rows if all(r.get(k) == v for k, v in where.items())]

    def markdown(self) -> str:
        lines = ["| " + " | ".join(self.columns) + " |", "|" + "|".join("---" for _ in self.columns) + "|"]
        for r in self.rows:
            lines.append("| " + " | ".join(fmt(r.get(c)) for c in self.columns) + " |")
        return "\n".join(lines)

    def write(self, out: Path):
        with open(out / f"{self.name}.csv", "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=self.columns)
            w.writeheader()
            for r in self.rows:
                w.writerow({c: r.get(c, "") for c in self.columns})


class Report:
    """Collects tables, figures and notes; writes ``<out>/results.md`` plus one CSV per table, and prints."""

    def __init__(self, out: Path, title: str, echo: bool = True):
        self.out = out
        self.title = title
        self.echo = echo
        self.parts: List[str] = [f"# {title}\n"]
        self.tables: Dict[str, Table] = {}
        self.t0 = time.perf_counter()

    def table(self, table: Table):
        self.tables[table.name] = table
        table.write(self.out)
        text = (f"## {table.title}\n\n" if table.title else "") + table.markdown() + f"\n\n(`{table.name}.csv`)\n"
        self.parts.append(text)
        if self.echo:
            print("\n" + text, flush=True)

    def note(self, text: str):
        self.parts.append(text + "\n")
        if self.echo:
            print(text, flush=True)

    def figure(self, fig, name: str, caption: str = ""):
        path = self.out / f"{name}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=120, bbox_inches="tight")
        import matplotlib.pyplot as plt
        plt.close(fig)
        self.parts.append(f"![{caption or name}]({name}.png)\n")
        if self.echo:
            print(f"figure: {path}", flush=True)

    def write(self) -> Path:
        self.parts.append(f"_total time {time.perf_counter() - self.t0:.1f} s_\n")
        path = self.out / "results.md"
        path.write_text("\n".join(self.parts), encoding="utf-8")
        if self.echo:
            print(f"results: {path}", flush=True)
        return path


def pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


# ------------------------------------------------------------------------------------------------- checks
class Checks:
    """Conclusions asserted in --quick mode; every check is also recorded in the report."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.results: List[tuple] = []

    def __call__(self, ok: bool, message: str, strict: bool = True):
        """Record a conclusion; ``strict=False`` ones are reported but never fail the run."""
        self.results.append((bool(ok), message if strict else message + " (informative)", strict))

    @property
    def failed(self) -> List[str]:
        return [m for ok, m, strict in self.results if strict and not ok]

    def finish(self, report: Report):
        """Record the checks in the report, write it, then (in --quick mode) raise if any check failed."""
        if self.results:
            report.note("## Checks" + ("" if self.enabled else " (informative; asserted with --quick)") + "\n\n"
                        + "\n".join(f"- [{'x' if ok else ' '}] {m}" for ok, m, _ in self.results))
        report.write()
        if self.enabled and self.failed:
            raise AssertionError("experiment checks failed:\n  " + "\n  ".join(self.failed))
