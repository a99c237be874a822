"""Decoding on top of the modules: batched greedy (``greedy``) and beam search (``beam``)."""
