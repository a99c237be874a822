"""What a user runs around the model: training (``train``), data (``data``, ``tasks``),
checkpoints, plots and the command line (``cli``). Nothing below this package imports it."""
