// The K best centroids of each row of scores [N, C], best first; equal scores go to the lower
// index (NaN counts as -inf). Output selected [N, K] (uint32).
// One threadgroup of THREADS threads per row (grid (THREADS, N, 1)): thread t keeps the scores
// t, t + THREADS, ... in registers; each of the K rounds reduces every thread's best remaining
// score within its simdgroup (simd_max / simd_min, no memory), then across the simdgroups
// through threadgroup memory with a single barrier (the two buffers alternate between rounds,
// so a round never overwrites what a slower thread may still be reading).
constexpr int PER_THREAD = (C + THREADS - 1) / THREADS;
constexpr int SIMDGROUPS = THREADS / 32;
constexpr uint NONE = 0xFFFFFFFFu;
static_assert(PER_THREAD <= 32, "the taken mask holds 32 scores per thread");
static_assert(THREADS % 32 == 0, "whole simdgroups: every lane takes part in simd_max / simd_min");
threadgroup float group_best[2][SIMDGROUPS];
threadgroup uint group_index[2][SIMDGROUPS];
uint tid = thread_index_in_threadgroup;
uint lane = thread_index_in_simdgroup;
uint simd_group = simdgroup_index_in_threadgroup;
uint n = threadgroup_position_in_grid.y;
float own[PER_THREAD];
for (int j = 0; j < PER_THREAD; j++) {
  uint c = j * THREADS + tid;
  float score = c < C ? float(scores[size_t(n) * C + c]) : -INFINITY;
  own[j] = metal::isnan(score) ? -INFINITY : score;
}
uint taken = 0;
for (int r = 0; r < K; r++) {
  float best = -INFINITY;
  uint best_index = NONE;
  for (int j = 0; j < PER_THREAD; j++) {
    uint c = j * THREADS + tid;
    bool available = c < C && ((taken >> j) & 1u) == 0;
    if (available && (best_index == NONE || own[j] > best)) {
      best = own[j];
      best_index = c;
    }
  }
  float simd_best = metal::simd_max(best);
  uint simd_index = metal::simd_min(best == simd_best ? best_index : NONE);
  int parity = r & 1;
  if (lane == 0) {
    group_best[parity][simd_group] = simd_best;
    group_index[parity][simd_group] = simd_index;
  }
  metal::threadgroup_barrier(metal::mem_flags::mem_threadgroup);
  float winner_score = group_best[parity][0];
  uint winner = group_index[parity][0];
  for (int g = 1; g < SIMDGROUPS; g++) {
    float score = group_best[parity][g];
    uint index = group_index[parity][g];
    bool better = score > winner_score || (score == winner_score && index < winner);
    if (index != NONE && (winner == NONE || better)) {
      winner_score = score;
      winner = index;
    }
  }
  if (tid == 0) {
    selected[size_t(n) * K + r] = winner;
  }
  if (winner != NONE && winner % THREADS == tid) {
    taken |= 1u << (winner / THREADS);
  }
}
