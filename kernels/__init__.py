"""Triton kernels of seq2seq_fast, installed as ``seq2seq_fast.kernels``."""
