"""d2l's ``show_heatmaps`` and ``Animator``, drawn with matplotlib's object API (no pyplot state,
no display backend): shown in a notebook as d2l's are, written to PNG files elsewhere (one line
on stderr says where). Without matplotlib (optional) they print a one-line note and draw nothing.
"""
import collections
import os
import sys

import torch

from seq2seq_fast.tools.extras import optional_import

PLOT_DIR_ENV = "SEQ2SEQ_FAST_PLOT_DIR"  # folder of the PNG files drawn outside a notebook (default: cwd)
_drawn = collections.Counter()  # PNG files named so far in this process, per kind


def in_notebook():
    """Whether this runs in a Jupyter kernel (where figures are displayed, not written)."""
    ipython = sys.modules.get("IPython")  # a kernel has imported it; no import here
    shell = ipython.get_ipython() if ipython is not None and hasattr(ipython, "get_ipython") else None
    return shell is not None and "IPKernelApp" in getattr(shell, "config", {})


def next_png(kind):
    """A fresh PNG path for a figure of ``kind`` drawn outside a notebook: ``kind-N.png`` in
    ``$SEQ2SEQ_FAST_PLOT_DIR`` or the working folder, N counting this process's figures."""
    _drawn[kind] += 1
    return os.path.abspath(os.path.join(os.environ.get(PLOT_DIR_ENV) or os.getcwd(), f"{kind}-{_drawn[kind]}.png"))


def _display(fig, clear=False):
    from IPython import display

    display.display(fig)
    if clear:
        display.clear_output(wait=True)


def show_heatmaps(matrices, xlabel, ylabel, titles=None, figsize=(2.5, 2.5), cmap="Reds", *,
                  xticklabels=None, yticklabels=None, path=None):
    """d2l's ``show_heatmaps``: ``matrices`` (num_rows, num_cols, queries, keys) as a grid of
    ``imshow`` panels sharing axes, ``xlabel`` under the last row, ``ylabel`` left of the first
    column, ``titles[j]`` over column j, one colour bar; optional token tick labels.

    Saved to ``path`` when given; else displayed in a notebook (returns None, as d2l) or written
    to ``heatmap-N.png`` (see ``next_png``) with one line on stderr naming it. Returns the
    matplotlib ``Figure`` unless displayed; None without matplotlib.

    >>> show_heatmaps(weights.reshape(1, 1, S, T), "Key positions", "Query positions", path="attn.png")
    """
    if not isinstance(matrices, torch.Tensor):
        matrices = torch.as_tensor(matrices)
    if matrices.dim() != 4:
        raise ValueError(f"matrices must have shape (num_rows, num_cols, queries, keys), got {tuple(matrices.shape)}")
    if min(matrices.shape) == 0:
        raise ValueError(f"matrices must not be empty, got shape {tuple(matrices.shape)}")
    figure = optional_import("matplotlib.figure", "show_heatmaps draws nothing")
    if figure is None:
        return None
    num_rows, num_cols = matrices.shape[0], matrices.shape[1]
    fig = figure.Figure(figsize=figsize)
    axes = fig.subplots(num_rows, num_cols, sharex=True, sharey=True, squeeze=False)
    pcm = None
    for i, (row_axes, row_matrices) in enumerate(zip(axes, matrices)):
        for j, (ax, matrix) in enumerate(zip(row_axes, row_matrices)):
            pcm = ax.imshow(matrix.detach().cpu().float().numpy(), cmap=cmap)
            if i == num_rows - 1:
                ax.set_xlabel(xlabel)
            if j == 0:
                ax.set_ylabel(ylabel)
            if titles:
                ax.set_title(titles[j])
            if xticklabels is not None:
                ax.set_xticks(range(len(xticklabels)), labels=xticklabels, rotation=90)
            if yticklabels is not None:
                ax.set_yticks(range(len(yticklabels)), labels=yticklabels)
    fig.colorbar(pcm, ax=axes, shrink=0.6)
    if path is None and in_notebook():
        _display(fig)
        return None
    if path is None:
        path = next_png("heatmap")
        print(f"show_heatmaps: drawn to {path}", file=sys.stderr)
    fig.savefig(path, dpi=150, bbox_inches="tight")
    return fig


class Animator:
    """d2l's ``Animator``: lines that grow with every ``add(x, y)`` (one line per entry of ``y``),
    drawn in ``axes[0]`` with d2l's axis settings. The points are kept in ``X`` and ``Y``.

    In a notebook it redraws in place as d2l's does; elsewhere every ``add`` rewrites one PNG,
    ``path`` or ``animator-N.png`` (see ``next_png``), which a line on stderr names when created.
    Without matplotlib it keeps the points and draws nothing.

    >>> animator = Animator(xlabel="epoch", ylabel="loss", xlim=[1, 10], path="loss.png")
    >>> for epoch in range(1, 11):
    ...     animator.add(epoch, 1 / epoch)
    """

    def __init__(self, xlabel=None, ylabel=None, legend=None, xlim=None, ylim=None, xscale="linear",
                 yscale="linear", fmts=("-", "m--", "g-.", "r:"), nrows=1, ncols=1, figsize=(3.5, 2.5), *,
                 path=None):
        self.axis_settings = dict(xlabel=xlabel, ylabel=ylabel, xlim=xlim, ylim=ylim, xscale=xscale,
                                  yscale=yscale, legend=legend or [])
        self.X, self.Y, self.fmts, self.path = None, None, fmts, path
        self.fig, self.axes = None, None
        figure = optional_import("matplotlib.figure", "the Animator keeps its points but draws nothing")
        if figure is not None:
            self.fig = figure.Figure(figsize=figsize)
            axes = self.fig.subplots(nrows, ncols)
            self.axes = [axes] if nrows * ncols == 1 else axes
            if path is None and not in_notebook():
                self.path = next_png("animator")
                print(f"Animator: drawing to {self.path} (rewritten on every add)", file=sys.stderr)

    def config_axes(self):
        s, ax = self.axis_settings, self.axes[0]
        ax.set_xlabel(s["xlabel"])
        ax.set_ylabel(s["ylabel"])
        ax.set_xscale(s["xscale"])
        ax.set_yscale(s["yscale"])
        ax.set_xlim(s["xlim"])
        ax.set_ylim(s["ylim"])
        if s["legend"]:
            ax.legend(s["legend"])
        ax.grid()

    def add(self, x, y):
        """Append point ``(x[i], y[i])`` to line i (a scalar ``x`` serves every line); None skips."""
        if not hasattr(y, "__len__"):
            y = [y]
        n = len(y)
        if not hasattr(x, "__len__"):
            x = [x] * n
        if not self.X:
            self.X = [[] for _ in range(n)]
        if not self.Y:
            self.Y = [[] for _ in range(n)]
        for i, (a, b) in enumerate(zip(x, y)):
            if a is not None and b is not None:
                self.X[i].append(a)
                self.Y[i].append(b)
        if self.fig is None:
            return
        self.axes[0].cla()
        for xs, ys, fmt in zip(self.X, self.Y, self.fmts):
            self.axes[0].plot(xs, ys, fmt)
        self.config_axes()
        if self.path is None:  # in a notebook
            _display(self.fig, clear=True)
        else:
            self.fig.savefig(self.path, dpi=100)
