"""d2l's classes, thin: they own the parameters under d2l's names and hand each call to the
backend ``seq2seq_fast.ops.dispatch`` picks. ``cuda_graph`` replays a decoder forward from a
CUDA graph (the decoder's ``capture_cuda_graph=True``)."""
