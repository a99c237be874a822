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
  // The threads the CPU ops split a call over (csrc/cpu/chunks.h), whatever torch's own count:
  // 0 (the default) follows torch.get_num_threads(). Returns the previous setting.
  m.def("set_cpu_threads(int threads) -> int");
  // Whether the CPU step loops split a batch's rows over those threads (for_row_chunks in
  // csrc/cpu/loop.h); off by default (a busy machine: see there). Returns the previous setting.
  m.def("set_cpu_row_split(bool enabled) -> bool");
  // Whether the calling thread's CPU op calls from now on may run their large float32 GEMMs on
  // bfloat16 operands with float32 accumulation (csrc/gemm_precision.h; autocast's and bfloat16
  // models' calls do); returns the previous setting. A backward runs as its forward did.
  m.def("set_bf16_gemm(bool enabled) -> bool");
  // The kernel the CPU ops' bfloat16 GEMMs run on here (csrc/cpu/gemm_bf16.h): "amx" (this
  // extension's AMX tile kernel for a step loop's weights, MKL's for the rest), "avx512bf16"
  // (its AVX512-BF16 kernel for every GEMM: AMD Zen 4; SEQ2SEQ_FAST_AMX=0 on an AMX CPU),
  // "mkl" (MKL's, with SEQ2SEQ_FAST_AMX=0 SEQ2SEQ_FAST_AVX512BF16=0), or "none" where bfloat16
  // GEMMs are not faster than float32 ones (no bfloat16 units; timed once per process):
  // set_bf16_gemm then changes nothing.
  m.def("cpu_bf16_gemm() -> str");
  // a @ b as the CPU ops' bfloat16 GEMMs compute it: operands rounded to bfloat16, float32
  // accumulation and output, on the kernel cpu_bf16_gemm() names. packed: b taken as a step
  // loop's weight (packed first), else as any GEMM's operand. a (M, K) and b (K, N) float32 CPU,
  // each row-major or the transpose of a row-major matrix. For tests of the kernels against a
  // float64 product; ValueError where cpu_bf16_gemm() is "none".
  m.def("cpu_bf16_matmul(Tensor a, Tensor b, bool packed) -> Tensor");

  // ---- the attention decoder (d2l's Seq2SeqAttentionDecoder) ----
  // Shared arguments:
  //   X            int64 (B, S) token ids in [0, V) (teacher forcing: step t reads X[:, t])
  //   enc_outputs  (B >= 1, T >= 1, H) keys = values; its device and dtype are the call's
  //                (CPU: float32/float64; CUDA also float16/bfloat16), every float argument shares them
  //   hidden       (L, B, H) initial GRU state (messages say hidden_state, as d2l's decoder state)
  //   valid_lens   None or int64 (B,): keys j >= valid_lens[b] are hidden (d2l's -1e6 fill; 0 makes
  //                the weights uniform; values >= T mean all keys; negative raise); messages call it
  //                enc_valid_lens, as d2l's decoder state
  //   key_proj     (B, T, H) = W_k(enc_outputs), computed once per sequence by the caller
  //   params       the decoder's weights, one ordered list of 5 + 4L tensors, L >= 1:
  //                  [0]            embedding     (V, E)
  //                  [1]            W_q           (H, H)
  //                  [2]            w_v           (1, H)
  //                  [3 + k]        w_ih_k        (3H, H + E) for k = 0 (input [context ; embedding]), else (3H, H)
  //                  [3 + L + k]    w_hh_k        (3H, H)
  //                  [3 + 2L + k]   b_ih_k        (3H,)
  //                  [3 + 3L + k]   b_hh_k        (3H,)      (GRU gate order r, z, n, as torch's)
  //                  [3 + 4L]       dense_weight  (V, H)
  //                  [4 + 4L]       dense_bias    (V,)
  //                a dense of 0 rows (V = 0) skips the output layer: logits are (S, B, 0) (the
  //                training path computes them inside linear_masked_ce instead)
  //   attn_mask    None or (S, B, T) scaled dropout keep-mask of the attention weights
  //   layer_mask   None or (L - 1, S, B, H) scaled keep-mask of the inputs of layers 1.. (L >= 2)
  //
  // Teacher-forced forward over S steps. Returns logits (S, B, V), attention (S, B, T) (softmax
  // weights before dropout), states (L, S + 1, B, H) (states[:, 0] = hidden), and the
  // activations the backward reads: inputs (S, B, H + E) (layer 0's input per step) and
  // gates (S, L, B, 4H), both (0,) when keep_activations is false, and layer_inputs
  // (L - 1, S, B, H) or (0,) without layer_mask.
  m.def(
      "decoder_forward(Tensor X, Tensor enc_outputs, Tensor hidden, Tensor? valid_lens, Tensor key_proj, "
      "Tensor[] params, Tensor? attn_mask, Tensor? layer_mask, bool keep_activations) "
      "-> (Tensor logits, Tensor attention, Tensor states, Tensor inputs, Tensor layer_inputs, Tensor gates)");
  // What a decoder module's call returns, in one dispatch (composite: autograd and
  // torch.compile see decoder_forward): decoder_forward's arguments (the activations kept when
  // autograd records the call), returning logits (B, S, V), the final state (L, B, H) and the
  // attention weights (B, S, T): views of decoder_forward's step-major outputs.
  m.def(
      "decoder_call(Tensor X, Tensor enc_outputs, Tensor hidden, Tensor? valid_lens, Tensor key_proj, "
      "Tensor[] params, Tensor? attn_mask, Tensor? layer_mask) -> (Tensor logits, Tensor hidden_n, Tensor attention)");
  // Backward through time of decoder_forward, from the gradients of logits, attention and states
  // (each may be None), the forward's arguments (params: the same full list, biases included) and
  // its outputs. Returns the gradients of enc_outputs (as values), hidden, key_proj, and
  // grad_params: one per params entry, in params' order.
  m.def(
      "decoder_backward(Tensor? grad_logits, Tensor? grad_attention, Tensor? grad_states, Tensor X, "
      "Tensor enc_outputs, Tensor? valid_lens, Tensor key_proj, Tensor[] params, Tensor? attn_mask, "
      "Tensor? layer_mask, Tensor attention, Tensor states, Tensor inputs, Tensor layer_inputs, Tensor gates) "
      "-> (Tensor grad_enc_outputs, Tensor grad_hidden, Tensor grad_key_proj, Tensor[] grad_params)");
  // Batched greedy decoding from bos until every row produced eos or max_len (>= 1) steps ran;
  // bos and eos in [0, V). Masks as decoder_forward with max_len steps. Returns tokens (B, steps)
  // int64 with eos past each row's end, lengths (B,) int64 (tokens before the first eos),
  // attention (B, steps, T) or (0,) when return_attention is false.
  m.def(
      "greedy_decode(Tensor enc_outputs, Tensor hidden, Tensor? valid_lens, Tensor key_proj, Tensor[] params, "
      "Tensor? attn_mask, Tensor? layer_mask, int bos, int eos, int max_len, bool return_attention) "
      "-> (Tensor tokens, Tensor lengths, Tensor attention)");
  // The decoder state's keys for a call without gradients (CPU): values = enc_outputs (B >= 1,
  // T >= 1, H), any strides (d2l's state holds a permuted view), laid out contiguously, and
  // key_proj = values @ W_k^T (W_k (H, H), the attention's key projection, no bias): the
  // enc_outputs and key_proj every decoder op takes. No autograd: a call that needs gradients
  // projects through torch.
  m.def("project_keys(Tensor enc_outputs, Tensor W_k) -> (Tensor values, Tensor key_proj)");
  // A dropout keep-mask of shape `size` with like's dtype and device: 1 / (1 - p) with
  // probability 1 - p, else 0, from a counter-based stream keyed by torch's default generator of
  // like's device (CPU: float32/float64; CUDA also float16/bfloat16; see csrc/random.h).
  m.def("keep_mask(Tensor like, SymInt[] size, float p) -> Tensor");
  // d2l's MaskedSoftmaxCELoss: pred (B, S, V >= 1) logits (CPU: float32/float64/bfloat16; CUDA
  // float16/bfloat16/float32/float64; half types accumulated in float32), label (B, S) int64
  // ids in [0, V), valid_len (B,) int64 >= 0 (called valid_lens in error messages).
  // Returns loss (B,) = mean over the S steps of the cross-entropy, steps >= valid_len weighted 0,
  // and the log-sum-exp (B, S) of every row, which the backward reads; both in pred's dtype, but
  // float32 for bfloat16 pred on CPU (autocast's logits, whose loss d2l computes in float32).
  m.def("masked_ce_loss(Tensor pred, Tensor label, Tensor valid_len) -> (Tensor loss, Tensor lse)");
  // Gradient of masked_ce_loss w.r.t. pred, in pred's dtype, laid out as pred's memory when pred
  // is a (B, S, V) view of step-major (S, B, V) logits, else contiguous; grad_loss and lse in the
  // loss's dtype.
  m.def(
      "masked_ce_loss_backward(Tensor grad_loss, Tensor pred, Tensor label, Tensor valid_len, Tensor lse) "
      "-> Tensor grad_pred");
  // d2l's grad_clipping: the global 2-norm of grads (non-empty, contiguous, one device and one
  // dtype: CPU float32/float64) and, when it exceeds theta (> 0), every tensor scaled in place by
  // theta / norm. Returns the norm (0-dim, the grads' dtype). No host read of device data.
  m.def("clip_grad_norm_(Tensor(a!)[] grads, float theta) -> Tensor norm");
  // torch.optim.Adam's update without weight decay, amsgrad or maximize, for every parameter of
  // every group at once: params (CPU, contiguous, float32/float64, one dtype) with their
  // grads, exp_avgs and exp_avg_sqs (each the parameter's shape) and steps (one-value float
  // tensors, incremented here); the parameters come group after group, groups[g] (>= 1) of them
  // with lr[g] >= 0, betas in [0, 1), eps[g] > 0. Every argument is checked before anything is
  // written: a call that raises leaves every tensor as it was.
  m.def(
      "adam_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
      "Tensor(d!)[] steps, int[] groups, float[] lr, float[] beta1, float[] beta2, float[] eps) -> ()");
  // d2l's dense output layer and MaskedSoftmaxCELoss fused, for training: logits = hidden @ W^T + b
  // are computed chunk_rows (>= 1) rows at a time into one reused (chunk_rows, V) buffer and never
  // held whole. hidden (B, S, H) (CPU: float32/float64; CUDA also float16/bfloat16; a (B, S, H)
  // view of step-major (S, B, H) memory, as the decoder's top states, is read in place), weight
  // (V >= 1, H), bias (V,); label and valid_len as masked_ce_loss's. Returns loss (B,) as
  // masked_ce_loss's of the logits, lse (B, S) of every logits row, and, with with_grads, the
  // gradients of hidden (laid out as hidden's memory, as masked_ce_loss_backward's), weight and
  // bias for grad_loss = ones (B,), computed in the same pass (Liger-Kernel's trick: no second
  // GEMM over the vocabulary); without with_grads those three are empty (0,).
  m.def(
      "linear_masked_ce(Tensor hidden, Tensor weight, Tensor bias, Tensor label, Tensor valid_len, int chunk_rows, "
      "bool with_grads) -> (Tensor loss, Tensor lse, Tensor grad_hidden, Tensor grad_weight, Tensor grad_bias)");
  // Gradients of linear_masked_ce's loss for any grad_loss (B,), the logits recomputed chunk by
  // chunk from the forward's arguments and lse: grad_hidden (laid out as hidden's memory),
  // grad_weight (V, H), grad_bias (V,).
  m.def(
      "linear_masked_ce_backward(Tensor grad_loss, Tensor hidden, Tensor weight, Tensor bias, Tensor label, "
      "Tensor valid_len, Tensor lse, int chunk_rows) -> (Tensor grad_hidden, Tensor grad_weight, Tensor grad_bias)");
  // ---- the encoder (d2l's Seq2SeqEncoder) ----
  // Embedding of X (B >= 1, T) int64 token ids, then a multi-layer GRU from a zero state.
  //   params      one ordered list of 1 + 4L tensors, L >= 1; its embedding fixes the call's
  //               device and dtype:
  //                 [0]            embedding  (V, E)
  //                 [1 + k]        w_ih_k     (3H, E) for k = 0, else (3H, H)
  //                 [1 + L + k]    w_hh_k     (3H, H)
  //                 [1 + 2L + k]   b_ih_k     (3H,)
  //                 [1 + 3L + k]   b_hh_k     (3H,)
  //   layer_mask  None or (L - 1, T, B, H) scaled inter-layer dropout keep-mask (L >= 2)
  // Returns states (L, T + 1, B, H) (output = states[L - 1, 1:], final state = states[:, T]),
  // layer_inputs (L - 1, T, B, H) or (0,), gates (L, T, B, 4H) or (0,) without keep_activations.
  m.def(
      "encoder_forward(Tensor X, Tensor[] params, Tensor? layer_mask, bool keep_activations) "
      "-> (Tensor states, Tensor layer_inputs, Tensor gates)");
  // Backward of encoder_forward from the gradient of states; params the same full list.
  // Returns grad_params: one per params entry, in params' order.
  m.def(
      "encoder_backward(Tensor grad_states, Tensor X, Tensor[] params, Tensor? layer_mask, Tensor states, "
      "Tensor layer_inputs, Tensor gates) -> Tensor[] grad_params");

  // ---- a training step (csrc/training_step.cpp) ----
  // d2l's MaskedSoftmaxCELoss of EncoderDecoder(encoder, decoder)(X, dec_X, enc_valid_lens) and
  // the gradient of its sum, without autograd: encoder_forward(X, enc_params, enc_layer_mask),
  // the decoder's state from it (keys projected by W_k (H, H), no bias), decoder_forward(dec_X,
  // ..., dec_params, attn_mask, dec_layer_mask) without logits, linear_masked_ce(the top states,
  // dec_params' dense layer, label, valid_len, chunk_rows) and the backward ops in turn. The
  // arguments as those ops take them. Returns the loss (B,) and the gradients of enc_params,
  // dec_params (one per entry, in order) and W_k.
  m.def(
      "training_step_grads(Tensor X, Tensor[] enc_params, Tensor? enc_layer_mask, Tensor dec_X, "
      "Tensor? enc_valid_lens, Tensor[] dec_params, Tensor W_k, Tensor? attn_mask, Tensor? dec_layer_mask, "
      "Tensor label, Tensor valid_len, int chunk_rows) "
      "-> (Tensor loss, Tensor[] enc_grads, Tensor[] dec_grads, Tensor grad_W_k)");
}
