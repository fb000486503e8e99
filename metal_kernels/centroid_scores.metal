// scores[n, c] = hidden[n] . centroids[c] for every centroid c (float32 out).
// Inputs: hidden [N, D]; weight [ROWS, D] float, or packed [ROWS, D * BITS / 32] uint32 with
// scales/biases [ROWS, D / GROUP_SIZE] (a float head passes its weight in those slots, unused).
// Grid (32 * simdgroups, ceil(ROWS / (RPS * simdgroups)), N); each simdgroup scores RPS rows.
uint lane = thread_index_in_simdgroup;
uint n = threadgroup_position_in_grid.z;
uint first = (threadgroup_position_in_grid.y * simdgroups_per_threadgroup
              + simdgroup_index_in_threadgroup) * RPS;
HiddenSlice<D, BITS> h = load_hidden<D, BITS>(hidden + size_t(n) * D, lane);
for (int r = 0; r < RPS; r++) {
  uint row = first + r;
  if (row < ROWS) {  // the same for every lane of the simdgroup, as simd_sum requires
    float score = metal::simd_sum(
        row_dot<D, BITS, GROUP_SIZE>(weight, scales, biases, row, h, lane));
    if (lane == 0) {
      scores[size_t(n) * ROWS + row] = score;
    }
  }
}
