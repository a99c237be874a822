// Schemas of every seq2seq_fast op, in one TORCH_LIBRARY block; the per-device
// implementations register themselves in csrc/cpu and csrc/cuda.
#include <Python.h>
#include <torch/library.h>

// Importing seq2seq_fast._C loads this library and so registers the ops; the module itself
// defines no Python functions (ops are reached through torch.ops.seq2seq_fast).
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(seq2seq_fast, m) {
  // Reports the build configuration; lets Python check the library loaded.
  m.def("build_info() -> str");
  // The CPU ops' block cache (csrc/cpu/workspace.h): bytes it holds; release frees them all and
  // returns how many bytes it freed.
  m.def("cpu_cache_bytes() -> int");
  m.def("release_cpu_cache() -> int");

  // Teacher-forced attention decoder over S steps (d2l's Seq2SeqAttentionDecoder). X (B, S) int64;
  // enc_outputs = values (B, T, H); hidden (L, B, H); valid_lens None or int64 (B,); key_proj =
  // W_k(enc_outputs) (B, T, H); w_ih/w_hh/b_ih/b_hh one per GRU layer (gate order r, z, n; layer
  // 0's input is [context ; embedding]); attn_mask (S, B, T) and layer_mask (L - 1, S, B, H) are
  // scaled dropout keep-masks (None: no dropout). Returns logits (S, B, V), attention (S, B, T)
  // (softmax weights before dropout), states (L, S + 1, B, H) (states[:, 0] = hidden), and the
  // activations the backward reads: inputs (S, B, H + E), layer_inputs (L - 1, S, B, H) or (0,),
  // gates (S, L, B, 4H) or (0,) when keep_activations is false.
  m.def(
      "decoder_forward(Tensor X, Tensor enc_outputs, Tensor hidden, Tensor? valid_lens, Tensor key_proj, "
      "Tensor embedding, Tensor W_q, Tensor w_v, Tensor[] w_ih, Tensor[] w_hh, Tensor[] b_ih, Tensor[] b_hh, "
      "Tensor dense_weight, Tensor dense_bias, Tensor? attn_mask, Tensor? layer_mask, bool keep_activations) "
      "-> (Tensor logits, Tensor attention, Tensor states, Tensor inputs, Tensor layer_inputs, Tensor gates)");
  // Backward through time of decoder_forward, from the gradients of logits, attention and states
  // (each may be None). Returns the gradients of enc_outputs (as values), hidden, key_proj, every
  // parameter (embedding, W_q, w_v, w_ih, w_hh, b_ih, b_hh, dense weight and bias).
  m.def(
      "decoder_backward(Tensor? grad_logits, Tensor? grad_attention, Tensor? grad_states, Tensor X, "
      "Tensor enc_outputs, Tensor? valid_lens, Tensor key_proj, Tensor embedding, Tensor W_q, Tensor w_v, "
      "Tensor[] w_ih, Tensor[] w_hh, Tensor dense_weight, Tensor? attn_mask, Tensor? layer_mask, "
      "Tensor attention, Tensor states, Tensor inputs, Tensor layer_inputs, Tensor gates) "
      "-> (Tensor grad_enc_outputs, Tensor grad_hidden, Tensor grad_key_proj, Tensor grad_embedding, "
      "Tensor grad_W_q, Tensor grad_w_v, Tensor[] grad_w_ih, Tensor[] grad_w_hh, Tensor[] grad_b_ih, "
      "Tensor[] grad_b_hh, Tensor grad_dense_weight, Tensor grad_dense_bias)");
  // Batched greedy decoding from bos until every row produced eos or max_len steps ran. Masks as
  // decoder_forward with max_len steps. Returns tokens (B, steps) int64 with eos past each row's
  // end, lengths (B,) int64 (tokens before the first eos), attention (B, steps, T) or (0,).
  m.def(
      "greedy_decode(Tensor enc_outputs, Tensor hidden, Tensor? valid_lens, Tensor key_proj, "
      "Tensor embedding, Tensor W_q, Tensor w_v, Tensor[] w_ih, Tensor[] w_hh, Tensor[] b_ih, Tensor[] b_hh, "
      "Tensor dense_weight, Tensor dense_bias, Tensor? attn_mask, Tensor? layer_mask, int bos, int eos, "
      "int max_len, bool return_attention) -> (Tensor tokens, Tensor lengths, Tensor attention)");
  // A dropout keep-mask of shape `size` with like's dtype and device: 1 / (1 - p) with
  // probability 1 - p, else 0, from a seed drawn from torch's default generator.
  m.def("keep_mask(Tensor like, SymInt[] size, float p) -> Tensor");
  // d2l's MaskedSoftmaxCELoss: pred (B, S, V) logits, label (B, S) int64, valid_len (B,) int64.
  // Returns loss (B,) = mean over the S steps of the cross-entropy, steps >= valid_len weighted 0,
  // and the log-sum-exp (B, S) of every row, which the backward reads.
  m.def("masked_ce_loss(Tensor pred, Tensor label, Tensor valid_len) -> (Tensor loss, Tensor lse)");
  // Gradient of masked_ce_loss w.r.t. pred, laid out as pred's memory when pred is a (B, S, V)
  // view of step-major (S, B, V) logits, else contiguous.
  m.def(
      "masked_ce_loss_backward(Tensor grad_loss, Tensor pred, Tensor label, Tensor valid_len, Tensor lse) "
      "-> Tensor grad_pred");
  // d2l's Seq2SeqEncoder: embedding of X (B, T) then a multi-layer GRU from a zero state; layer_mask
  // (L - 1, T, B, H) is the scaled inter-layer dropout keep-mask. Returns states (L, T + 1, B, H)
  // (output = states[L - 1, 1:], final state = states[:, T]), layer_inputs (L - 1, T, B, H) or (0,),
  // gates (L, T, B, 4H) or (0,).
  m.def(
      "encoder_forward(Tensor X, Tensor embedding, Tensor[] w_ih, Tensor[] w_hh, Tensor[] b_ih, "
      "Tensor[] b_hh, Tensor? layer_mask, bool keep_activations) "
      "-> (Tensor states, Tensor layer_inputs, Tensor gates)");
  m.def(
      "encoder_backward(Tensor grad_states, Tensor X, Tensor embedding, Tensor[] w_ih, Tensor[] w_hh, "
      "Tensor? layer_mask, Tensor states, Tensor layer_inputs, Tensor gates) "
      "-> (Tensor grad_embedding, Tensor[] grad_w_ih, Tensor[] grad_w_hh, Tensor[] grad_b_ih, "
      "Tensor[] grad_b_hh)");
}
