// Compile-time options of the row kernels: what a launch asks of every element of
// every row, so that each combination gets its own loop and the common one (class
// index, no soft-cap, no weights) carries nothing it does not use.
//
// One bit per option; the kernels take the bits as `unsigned kOpts` and read them
// through Options<kOpts>. Adding an option is one more bit here, its test in
// is_canonical() where it only makes sense with others, one line in
// row_option_bits(), and its use in the loops (bench/sass_stats.py names the bits:
// keep its FLAGS in step).
//   Planned (issue 16): a logit multiplier before the soft-cap and a temperature
//   after it -- without soft-cap both fold into the loops' runtime exp2 scale and the
//   gradient coefficients, so only "multiplier with soft-cap" needs a bit -- and a
//   per-row argmax tracked in the statistics pass (one bit).
#pragma once

#include <type_traits>
#include <utility>

#include "cuda/launch.h"

namespace fused_ce::cuda {

enum RowOption : unsigned {
  kOptSmoothing = 1u << 0,  // class index with label smoothing: T_c = smoothing * w_c off the target
  kOptProbs = 1u << 1,      // probability targets: T_c = w_c * (on_target * q_c + smoothing)
  kOptWeights = 1u << 2,    // per-class weights in the loops (with kOptSmoothing or kOptProbs)
  kOptSoftcap = 1u << 3,    // z = cap * tanh(x / cap)
  kOptGrad = 1u << 4,       // the forward pass also writes the gradient
};
constexpr unsigned kOptionBits = 5;

template <unsigned kBits>
struct Options {
  static constexpr bool smoothing = (kBits & kOptSmoothing) != 0;
  static constexpr bool probs = (kBits & kOptProbs) != 0;
  static constexpr bool weights = (kBits & kOptWeights) != 0;
  static constexpr bool softcap = (kBits & kOptSoftcap) != 0;
  static constexpr bool grad = (kBits & kOptGrad) != 0;
  // T off the one-hot entry is not zero: the loops add it element by element.
  static constexpr bool spread = smoothing || probs;
  // Nothing but logits in the loops: exp2 of one FFMA per element.
  static constexpr bool lean = !spread && !softcap;
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
  if (p.cap > 0) bits |= kOptSoftcap;
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
