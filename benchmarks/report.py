"""The runner's output: the header that says what ran where, the tables (one format, times in
ms, for both sections) with footnotes, and the plot."""
from rows import FLOOR

COLUMNS = ["config", "dtype", "workload", "impl", "median ms", "speedup vs reference", "x floor", "note"]
MEMORY_COLUMN = "step MiB / peak MiB"

EXPLANATION = """\
median ms: median time of one call, implementations of a group timed in interleaved rounds in
  this one process. speedup vs reference: the reference's time over the row's (> 1: faster).
x floor: the row's time over the floor (>= 1 for every measured row, as a lower bound demands).
floor: the workload's GEMMs run by torch.matmul on operands of exactly their shapes (per-step
  GEMMs have M = B rows, GEMMs batched over steps M = S·B; less the same calls on 1x1x1
  operands; with several threads, the faster of the BLAS's threading and rows split over the
  threads), or its bytes copied, whichever takes longer, run in the group's interleaved rounds
  and counted at the fastest call (benchmarks/floor.py).
autocast-bf16: the float32 model called under torch.autocast in bfloat16; its floor runs the
  GEMMs in bfloat16 (the logits' bytes at bfloat16 size), and its base is the reference in float32.
A row that was not measured shows a footnote saying why."""


def header(info, selection_lines):
    lines = ["seq2seq_fast benchmark"]
    lines += [f"  {key}: {value}" for key, value in info.items()]
    return "\n".join(lines + [""] + selection_lines + ["", EXPLANATION])


def _fmt(value, spec):
    return "" if value is None else format(value, spec)


def _cells(row, marks):
    measured = row["median_s"] is not None
    time_ms = _fmt(row["median_s"] and row["median_s"] * 1e3, ".3f") if measured else "not measured"
    speedup = _fmt(row["speedup"], ".2f") + ("x" if row["speedup"] else "")
    note = f"[{marks[row['note']]}]" if row["note"] else ""
    if row["impl"] == FLOOR:
        note = f"{row['floor_bound']}-bound"
    return [row["config"], row["dtype"], row["workload"], row["impl"], time_ms, speedup,
            _fmt(row["over_floor"], ".2f"), note]


def table(rows, markdown=False):
    """The rows as one table (aligned text or markdown) followed by its numbered footnotes."""
    marks = {}
    for row in rows:
        if row["note"] and row["note"] not in marks:
            marks[row["note"]] = len(marks) + 1
    memory = any(r.get("step_mib") is not None for r in rows)
    columns = COLUMNS + ([MEMORY_COLUMN] if memory else [])
    lines = []
    for row in rows:
        cells = _cells(row, marks)
        if memory:
            cells.append("" if row.get("step_mib") is None else f"{row['step_mib']:.1f} / {row['peak_mib']:.0f}")
        lines.append(cells)
    if markdown:
        out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        out += ["| " + " | ".join(cells) + " |" for cells in lines]
    else:
        widths = [max(len(c), *(len(cells[i]) for cells in lines)) if lines else len(c) for i, c in enumerate(columns)]
        out = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip()]
        out += ["  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip() for cells in lines]
    if marks:
        out.append("")
        out += [f"[{n}] {note}" for note, n in marks.items()]
    return "\n".join(out)


def plot(rows, path):
    """Bars: each implementation's speedup over the reference per (section, config, dtype,
    workload); a black line over each group: the floor's (the most any implementation could)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = lambda r: (r["section"], r["config"], r["dtype"], r["workload"])  # noqa: E731
    groups = list(dict.fromkeys(key(r) for r in rows))
    impls = [i for i in dict.fromkeys(r["impl"] for r in rows) if i not in ("reference", FLOOR)]
    colors = dict(zip(impls, plt.get_cmap("tab10").colors))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(groups) + 2), 4.5))
    labelled = set()
    for i, g in enumerate(groups):
        bars = [(r["impl"], r["speedup"]) for r in rows if key(r) == g and r["impl"] in colors and r["speedup"]]
        width = 0.8 / max(1, len(bars))
        for k, (impl, speedup) in enumerate(bars):
            ax.bar(i - 0.4 + (k + 0.5) * width, speedup, width, color=colors[impl],
                   label=None if impl in labelled else impl)
            labelled.add(impl)
        floors = [r["speedup"] for r in rows if key(r) == g and r["impl"] == FLOOR and r["speedup"]]
        if floors:
            ax.hlines(floors[0], i - 0.45, i + 0.45, colors="black", linewidth=2,
                      label=None if FLOOR in labelled else "floor (lower bound on time)")
            labelled.add(FLOOR)
    ax.axhline(1.0, color="grey", linewidth=0.8, linestyle=":", label="reference (1x)")
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([f"{s}\n{c} {d}\n{w}" for s, c, d, w in groups], fontsize=7)
    ax.set_ylabel("speedup over the d2l reference (x, log)")
    ax.set_yscale("log")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
