#include <torch/library.h>

#include <string>

namespace seq2seq_fast {

std::string build_info() {
#ifdef SEQ2SEQ_FAST_WITH_CUDA
  return "cpu+cuda";
#else
  return "cpu";
#endif
}

}  // namespace seq2seq_fast

TORCH_LIBRARY_IMPL(seq2seq_fast, CompositeExplicitAutograd, m) {
  m.impl("build_info", &seq2seq_fast::build_info);
}
