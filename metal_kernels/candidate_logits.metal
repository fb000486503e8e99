// Logits of the candidate tokens: the P vocab rows of each of the K selected centroids.
// Inputs: hidden [N, D]; the lm_head as in centroid_scores.metal; selected [N, K] centroid
// indices; token_ordering [K_all * P], centroid c's tokens being token_ordering[c * P + p].
// ORDERED: the lm_head rows are stored in centroid order (row c * P + p holds token
// token_ordering[c * P + p]), so a centroid's rows are contiguous; else rows are vocab ids.
// Outputs ids [N, K * P] (int32 token ids) and logits [N, K * P] (float32).
// Grid (32 * simdgroups, ceil(K * P / (RPS * simdgroups)), N); each simdgroup does RPS rows.
uint lane = thread_index_in_simdgroup;
uint n = threadgroup_position_in_grid.z;
uint first = (threadgroup_position_in_grid.y * simdgroups_per_threadgroup
              + simdgroup_index_in_threadgroup) * RPS;
HiddenSlice<D, BITS> h = load_hidden<D, BITS>(hidden + size_t(n) * D, lane);
for (int r = 0; r < RPS; r++) {
  uint candidate = first + r;
  if (candidate < K * P) {  // the same for every lane of the simdgroup, as simd_sum requires
    uint slot = uint(selected[size_t(n) * K + candidate / P]) * P + candidate % P;
    int token = int(token_ordering[slot]);
    uint row = ORDERED ? slot : uint(token);
    float logit = metal::simd_sum(
        row_dot<D, BITS, GROUP_SIZE>(weight, scales, biases, row, h, lane));
    if (lane == 0) {
      logits[size_t(n) * K * P + candidate] = logit;
      ids[size_t(n) * K * P + candidate] = token;
    }
  }
}
