"""The backends: each runs the decoder's step loop its own way, behind the same entry points.

``torch_ops`` (a restructured loop of ATen ops, runs everywhere), ``cpp_ops`` (the compiled
extension ``seq2seq_fast._C``: wrappers and fake implementations of its ``torch.ops``) and
``triton_ops`` (the fused Triton attention kernel as a custom op, in the torch loop). Each is
imported on first use by ``seq2seq_fast.ops.dispatch``; importing this package imports none of
them. Backends import only ``extension`` (loading ``_C``), ``seq2seq_fast.kernels`` and each
other, never the layers above.
"""
