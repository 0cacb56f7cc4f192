// Compile-time options of the row kernels: what a launch asks of every element of
// every row, so that each combination gets its own loop and the common one (class
// index, no soft-cap, no weights) carries nothing it does not use.
//
// One bit per option; the kernels take the bits as `unsigned kOpts` and read them
// through Options<kOpts>. Adding an option is one more bit here, its test in
// is_canonical() where it only makes sense with others, one line in
// row_option_bits(), and its use in the loops (bench/sass_stats.py names the bits:
// keep its FLAGS in step).
//   The logit scale and the temperature share the soft-cap's bit: any logit map but
//   the identity (LogitMap in common/ce_math.h, the CPU kernels' own) goes through
//   the mapped loops, so the common path keeps its lean loop and no combination
//   doubles the instantiations. (They could fold into the lean loop's exp2 scale;
//   not worth a bit until a GPU says temperature-scaled training is hot.)
#pragma once

#include <type_traits>
#include <utility>

#include "cuda/launch.h"

namespace fused_ce::cuda {

enum RowOption : unsigned {
  kOptSmoothing = 1u << 0,  // class index with label smoothing: T_c = smoothing * w_c off the target
  kOptProbs = 1u << 1,      // probability targets: T_c = w_c * (on_target * q_c + smoothing)
  kOptWeights = 1u << 2,    // per-class weights in the loops (with kOptSmoothing or kOptProbs)
  kOptLogitMap = 1u << 3,   // z = softcap(logit_scale * x) / temperature, not the identity
  kOptGrad = 1u << 4,       // the forward pass also writes the gradient
};
constexpr unsigned kOptionBits = 5;

template <unsigned kBits>
struct Options {
  static constexpr bool smoothing = (kBits & kOptSmoothing) != 0;
  static constexpr bool probs = (kBits & kOptProbs) != 0;
  static constexpr bool weights = (kBits & kOptWeights) != 0;
  static constexpr bool mapped = (kBits & kOptLogitMap) != 0;
  static constexpr bool grad = (kBits & kOptGrad) != 0;
  // T off the one-hot entry is not zero: the loops add it element by element.
  static constexpr bool spread = smoothing || probs;
  // Nothing but logits in the loops: exp2 of one FFMA per element.
  static constexpr bool lean = !spread && !mapped;
};

// The combinations that get kernels. With a class index and no smoothing the weights
// touch only the target's entry, once per row (read at run time), so no loop needs them.
constexpr bool is_canonical(unsigned bits) {
  const bool smoothing = bits & kOptSmoothing, probs = bits & kOptProbs, weights = bits & kOptWeights;
  return bits < (1u << kOptionBits) && !(smoothing && probs) && !(weights && !smoothing && !probs);
}

// The options of a call (canonical).
template <typename scalar_t>
unsigned row_option_bits(const RowProblem<scalar_t>& p, bool with_grad) {
  unsigned bits = 0;
  if (p.target_probs != nullptr) {
    bits |= kOptProbs;
  } else if (p.smoothing != 0) {
    bits |= kOptSmoothing;
  }
  if (p.weight != nullptr && (bits & (kOptSmoothing | kOptProbs))) bits |= kOptWeights;
  if (!p.map.identity()) bits |= kOptLogitMap;
  if (with_grad) bits |= kOptGrad;
  return bits;
}

namespace detail {
template <unsigned kBits, unsigned kAllowed, typename Fn>
bool call_if_options(unsigned bits, Fn& fn) {
  if constexpr (is_canonical(kBits) && (kBits & ~kAllowed) == 0) {
    if (bits == kBits) {
      fn(std::integral_constant<unsigned, kBits>{});
      return true;
    }
  }
  return false;
}

template <unsigned kAllowed, typename Fn, unsigned... kAll>
bool dispatch_options(unsigned bits, Fn& fn, std::integer_sequence<unsigned, kAll...>) {
  return (call_if_options<kAll, kAllowed>(bits, fn) || ...);
}
}  // namespace detail

// fn(std::integral_constant<unsigned, bits>) for a canonical `bits` within kAllowed;
// instantiates fn for every such combination. False if `bits` is not one.
template <unsigned kAllowed, typename Fn>
bool dispatch_options(unsigned bits, Fn&& fn) {
  return detail::dispatch_options<kAllowed>(bits, fn, std::make_integer_sequence<unsigned, 1u << kOptionBits>{});
}

}  // namespace fused_ce::cuda
