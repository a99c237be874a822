"""d2l's ``show_heatmaps`` (a grid of attention matrices sharing one colour bar), written to a
file with matplotlib's object API, so no pyplot state or display backend is touched."""
import torch


def show_heatmaps(matrices, xlabel, ylabel, titles=None, figsize=(2.5, 2.5), cmap="Reds", *,
                  xticklabels=None, yticklabels=None, path=None):
    """Plot ``matrices`` (num_rows, num_cols, queries, keys) as d2l does: a grid of ``imshow``
    panels sharing axes, ``xlabel`` under the last row, ``ylabel`` left of the first column,
    ``titles[j]`` over column j, one colour bar. Optional token tick labels; saved to ``path``
    when given. Returns the matplotlib ``Figure``.

    >>> show_heatmaps(weights.reshape(1, 1, S, T), "Key positions", "Query positions", path="attn.png")
    """
    from matplotlib.figure import Figure

    if not isinstance(matrices, torch.Tensor):
        matrices = torch.as_tensor(matrices)
    if matrices.dim() != 4:
        raise ValueError(f"matrices must have shape (num_rows, num_cols, queries, keys), got {tuple(matrices.shape)}")
    num_rows, num_cols = matrices.shape[0], matrices.shape[1]
    fig = Figure(figsize=figsize)
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
    if path is not None:
        fig.savefig(path, dpi=150, bbox_inches="tight")
    return fig
