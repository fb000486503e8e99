// Helpers shared by the centroid-masked lm_head kernels (centroid_scores.metal,
// candidate_logits.metal). MLX prepends its own utils (metal_stdlib, bfloat16_t, float16_t).
//
// Layout, chosen for Apple GPUs: one simdgroup (32 threads, the SIMD width of every Apple GPU)
// computes the dot products of RPS weight rows with the hidden state. Lane l reads the slots
// l, l + 32, l + 64, ... of a row, where a slot is 4 consecutive elements of a float row or one
// packed uint32 word of a quantized row, so the 32 lanes of a simdgroup read adjacent memory
// (coalesced) and one simd_sum per row finishes the dot product: no threadgroup memory and no
// barriers. The hidden values a lane needs are loaded once into registers and reused for all
// its rows.

// The hidden values of one lane's slots, as float; `sum` (per slot) feeds the quantization
// biases: a quantized row's dot product is sum_g scale_g * (q_g . h_g) + bias_g * sum(h_g).
// (Metal keeps static data members in the constant address space, as MLX's own kernels do.)
template <int D, int BITS>
struct HiddenSlice {
  static constant constexpr const int VALUES = BITS == 0 ? 4 : 32 / BITS;
  static constant constexpr const int SLOTS = (D + 32 * VALUES - 1) / (32 * VALUES);
  float x[SLOTS][VALUES];
  float sum[SLOTS];
};

template <int D, int BITS, typename HiddenPtr>
HiddenSlice<D, BITS> load_hidden(HiddenPtr hidden, uint lane) {
  HiddenSlice<D, BITS> h;
  for (int s = 0; s < HiddenSlice<D, BITS>::SLOTS; s++) {
    int first = (s * 32 + int(lane)) * HiddenSlice<D, BITS>::VALUES;
    h.sum[s] = 0.0f;
    for (int v = 0; v < HiddenSlice<D, BITS>::VALUES; v++) {
      int i = first + v;
      h.x[s][v] = i < D ? float(hidden[i]) : 0.0f;
      h.sum[s] += h.x[s][v];
    }
  }
  return h;
}

// This lane's part of row `row` . hidden. BITS == 0: a float row of D elements (scales and
// biases unused). Otherwise an MLX affine-quantized row (mx.quantize layout): D * BITS / 32
// uint32 words holding 32 / BITS values each, lowest bits first; value = scale * q + bias with
// one scale and bias per GROUP_SIZE values.
template <int D, int BITS, int GROUP_SIZE, typename WeightPtr, typename ScalePtr>
float row_dot(
    WeightPtr weight,
    ScalePtr scales,
    ScalePtr biases,
    uint row,
    thread const HiddenSlice<D, BITS>& h,
    uint lane) {
  constexpr int VALUES = HiddenSlice<D, BITS>::VALUES;
  float acc = 0.0f;
  if constexpr (BITS == 0) {
    WeightPtr w = weight + size_t(row) * D;
    for (int s = 0; s < HiddenSlice<D, BITS>::SLOTS; s++) {
      int first = (s * 32 + int(lane)) * VALUES;
      for (int v = 0; v < VALUES; v++) {
        if (first + v < D) {
          acc += float(w[first + v]) * h.x[s][v];
        }
      }
    }
  } else {
    static_assert(GROUP_SIZE % VALUES == 0, "a packed word must not straddle two groups");
    constexpr int WORDS = D / VALUES;
    constexpr int GROUPS = D / GROUP_SIZE;
    constexpr uint MASK = (1u << BITS) - 1u;
    WeightPtr w = weight + size_t(row) * WORDS;
    for (int s = 0; s < HiddenSlice<D, BITS>::SLOTS; s++) {
      int word_index = s * 32 + int(lane);
      if (word_index < WORDS) {
        uint word = uint(w[word_index]);
        float qh = 0.0f;
        for (int v = 0; v < VALUES; v++) {
          qh += float((word >> (v * BITS)) & MASK) * h.x[s][v];
        }
        size_t group = size_t(row) * GROUPS + (word_index * VALUES) / GROUP_SIZE;
        acc += float(scales[group]) * qh + float(biases[group]) * h.sum[s];
      }
    }
  }
  return acc;
}
