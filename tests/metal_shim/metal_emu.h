// Runs Metal compute kernels (compiled as C++ against metal_shim.h) on the CPU: every thread of
// the grid runs its own copy of the kernel as a fiber (ucontext); the threads of a threadgroup
// interleave at simd_* calls and threadgroup barriers, which complete only when every live lane
// of the simdgroup (every thread of the threadgroup) has arrived, as on the GPU. Misuse that the
// GPU would punish with garbage or a hang is reported as an error instead: a simd_* call that
// not all live lanes make at the same call (kernel line and count), a barrier some thread
// never reaches, a buffer read or written out of
// bounds (buffers are passed as checked_ptr).
#pragma once

#if defined(__APPLE__) && !defined(_XOPEN_SOURCE)
#define _XOPEN_SOURCE 700  // macOS hides the (deprecated) ucontext functions otherwise
#endif
#include <ucontext.h>

#include <cstdio>
#include <functional>
#include <string>
#include <type_traits>
#include <vector>

#define METAL_EMU  // metal_shim.h: plain C++ address spaces and bfloat16
#include "metal_shim.h"

namespace emu {

inline std::string error;  // first problem of the current launch

inline void report(const std::string& message) {
  if (error.empty()) {
    error = message;
  }
}

// A buffer pointer that checks every access against the buffer's bounds.
template <typename T>
struct checked_ptr {
  T* base;
  long offset;
  long size;
  const char* name;

  template <typename I>
  checked_ptr operator+(I k) const {
    return {base, offset + long(k), size, name};
  }
  template <typename I>
  T& operator[](I i) const {
    long j = offset + long(i);
    if (j < 0 || j >= size) {
      report(std::string(name) + ": index " + std::to_string(j) + " out of bounds (" +
             std::to_string(size) + " elements)");
      static std::remove_const_t<T> scratch{};
      return scratch;
    }
    return base[j];
  }
};

// Everything Metal can pass as a kernel attribute, under the attribute's name.
struct Attributes {
  uint3 thread_position_in_grid, thread_position_in_threadgroup, threadgroup_position_in_grid;
  uint3 threads_per_threadgroup, threadgroups_per_grid, threads_per_grid, grid_size, grid_origin;
  uint3 dispatch_threads_per_threadgroup;
  uint thread_index_in_threadgroup, thread_index_in_simdgroup, simdgroup_index_in_threadgroup;
  uint simdgroups_per_threadgroup, dispatch_simdgroups_per_threadgroup, threads_per_simdgroup;
  uint thread_execution_width, thread_index_in_quadgroup, quadgroup_index_in_threadgroup;
  uint quadgroups_per_threadgroup, dispatch_quadgroups_per_threadgroup;
};

enum class Wait { running, simd, barrier, done };
enum class Op { sum, max, min };

struct Fiber {
  ucontext_t context;
  std::vector<char> stack;
  Attributes attributes;
  Wait wait = Wait::running;
  Op op = Op::sum;
  int line = 0;  // where in the kernel text the pending simd_* call is
  long calls = 0;  // simd_* calls made so far
  int barrier_line = 0;  // where the pending threadgroup_barrier is
  long barriers = 0;  // threadgroup_barrier calls made so far
  float f = 0;
  uint u = 0;
};

struct Threadgroup {
  std::vector<Fiber> fibers;
  ucontext_t scheduler;
  size_t current = 0;
  const std::function<void(const Attributes&)>* body = nullptr;
};

inline Threadgroup* active = nullptr;

inline Fiber& self() {
  return active->fibers[active->current];
}

inline void block(Wait wait) {
  Fiber& f = self();
  f.wait = wait;
  swapcontext(&f.context, &active->scheduler);
}

inline void fiber_main() {
  Fiber& f = self();
  (*active->body)(f.attributes);
  f.wait = Wait::done;  // uc_link returns to the scheduler
}

// Completes the simd_* call of simdgroup `lanes` once all its live lanes are waiting in one.
inline bool complete_simd(std::vector<Fiber*>& lanes) {
  std::vector<Fiber*> live;
  for (Fiber* f : lanes) {
    if (f->wait != Wait::done) {
      live.push_back(f);
    }
  }
  if (live.empty()) {
    return false;
  }
  bool any_simd = false;
  for (Fiber* f : live) {
    any_simd |= f->wait == Wait::simd;
  }
  if (!any_simd) {
    return false;
  }
  for (Fiber* f : live) {
    if (f->wait != Wait::simd || f->op != live[0]->op || f->line != live[0]->line ||
        f->calls != live[0]->calls) {
      report("simd_* call not made by every live lane of a simdgroup (divergent control flow)");
      return false;
    }
  }
  float fs = live[0]->f;
  uint us = live[0]->u;
  for (Fiber* f : live) {
    switch (f->op) {
      case Op::sum:
        fs = f == live[0] ? f->f : fs + f->f;
        break;
      case Op::max:
        fs = f->f > fs ? f->f : fs;
        break;
      case Op::min:
        us = f->u < us ? f->u : us;
        break;
    }
  }
  for (Fiber* f : live) {
    f->f = fs;
    f->u = us;
    f->wait = Wait::running;
  }
  return true;
}

inline void run_threadgroup(Threadgroup& tg, size_t simd_width) {
  for (auto& f : tg.fibers) {
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = f.stack.data();
    f.context.uc_stack.ss_size = f.stack.size();
    f.context.uc_link = &tg.scheduler;
    f.wait = Wait::running;
    makecontext(&f.context, fiber_main, 0);
  }
  active = &tg;
  while (error.empty()) {
    for (tg.current = 0; tg.current < tg.fibers.size(); tg.current++) {
      if (tg.fibers[tg.current].wait == Wait::running) {
        swapcontext(&tg.scheduler, &tg.fibers[tg.current].context);
      }
    }
    size_t done = 0, at_barrier = 0;
    for (auto& f : tg.fibers) {
      done += f.wait == Wait::done;
      at_barrier += f.wait == Wait::barrier;
    }
    if (done == tg.fibers.size()) {
      break;
    }
    bool progressed = false;
    for (size_t first = 0; first < tg.fibers.size(); first += simd_width) {
      std::vector<Fiber*> lanes;
      for (size_t i = first; i < first + simd_width && i < tg.fibers.size(); i++) {
        lanes.push_back(&tg.fibers[i]);
      }
      progressed |= complete_simd(lanes);
    }
    if (!progressed && at_barrier > 0) {
      if (at_barrier + done != tg.fibers.size()) {
        report("threadgroup_barrier not reached by every thread waiting elsewhere (deadlock)");
      } else if (done > 0) {
        report("threadgroup_barrier reached after some threads of the threadgroup returned");
      } else {
        for (auto& f : tg.fibers) {
          if (f.barrier_line != tg.fibers[0].barrier_line || f.barriers != tg.fibers[0].barriers) {
            report("threadgroup_barrier: threads wait at different barriers (divergent control flow)");
          }
          f.wait = Wait::running;
        }
        progressed = true;
      }
    }
    if (!progressed) {
      report("no thread can make progress (deadlock)");
    }
  }
  active = nullptr;
}

// Runs `body` for every thread of a grid of `grid` threads in threadgroups of `threadgroup`
// threads (MLX dispatches threads, not threadgroups, and clamps the threadgroup to the grid).
// Returns 0, or 1 with the problem in `message`.
inline int launch(
    const uint3 grid,
    uint3 group,
    const std::function<void(const Attributes&)>& body,
    char* message,
    int message_size) {
  error.clear();
  group = {group.x < grid.x ? group.x : grid.x, group.y < grid.y ? group.y : grid.y,
           group.z < grid.z ? group.z : grid.z};
  const uint simd_width = 32;
  uint3 groups = {(grid.x + group.x - 1) / group.x, (grid.y + group.y - 1) / group.y,
                  (grid.z + group.z - 1) / group.z};
  Threadgroup tg;
  tg.body = &body;
  for (uint gz = 0; gz < groups.z && error.empty(); gz++) {
    for (uint gy = 0; gy < groups.y && error.empty(); gy++) {
      for (uint gx = 0; gx < groups.x && error.empty(); gx++) {
        std::vector<Attributes> threads;
        for (uint z = 0; z < group.z; z++) {
          for (uint y = 0; y < group.y; y++) {
            for (uint x = 0; x < group.x; x++) {
              uint3 pos = {gx * group.x + x, gy * group.y + y, gz * group.z + z};
              if (pos.x >= grid.x || pos.y >= grid.y || pos.z >= grid.z) {
                continue;  // a partial threadgroup at the edge of the grid
              }
              Attributes a{};
              a.thread_position_in_grid = pos;
              a.thread_position_in_threadgroup = {x, y, z};
              a.threadgroup_position_in_grid = {gx, gy, gz};
              a.threads_per_threadgroup = group;
              a.dispatch_threads_per_threadgroup = group;
              a.threadgroups_per_grid = groups;
              a.threads_per_grid = grid;
              a.grid_size = grid;
              a.grid_origin = {0, 0, 0};
              a.thread_index_in_threadgroup = (z * group.y + y) * group.x + x;
              a.thread_index_in_simdgroup = a.thread_index_in_threadgroup % simd_width;
              a.simdgroup_index_in_threadgroup = a.thread_index_in_threadgroup / simd_width;
              uint size = group.x * group.y * group.z;
              a.simdgroups_per_threadgroup = (size + simd_width - 1) / simd_width;
              a.dispatch_simdgroups_per_threadgroup = a.simdgroups_per_threadgroup;
              a.threads_per_simdgroup = simd_width;
              a.thread_execution_width = simd_width;
              a.thread_index_in_quadgroup = a.thread_index_in_threadgroup % 4;
              a.quadgroup_index_in_threadgroup = a.thread_index_in_threadgroup / 4;
              a.quadgroups_per_threadgroup = (size + 3) / 4;
              a.dispatch_quadgroups_per_threadgroup = a.quadgroups_per_threadgroup;
              threads.push_back(a);
            }
          }
        }
        if (tg.fibers.size() != threads.size()) {
          tg.fibers = std::vector<Fiber>(threads.size());
          for (auto& f : tg.fibers) {
            f.stack.resize(1 << 16);
          }
        }
        for (size_t i = 0; i < threads.size(); i++) {
          tg.fibers[i].attributes = threads[i];
        }
        run_threadgroup(tg, simd_width);
      }
    }
  }
  if (!error.empty()) {
    std::snprintf(message, message_size, "%s", error.c_str());
    return 1;
  }
  return 0;
}

}  // namespace emu

namespace metal {

inline void threadgroup_barrier_at(int line, mem_flags) {
  emu::self().barrier_line = line;
  emu::self().barriers++;
  emu::block(emu::Wait::barrier);
}

inline float simd_op(emu::Op op, int line, float f, uint u, bool is_float, uint* u_out) {
  emu::Fiber& fiber = emu::self();
  fiber.op = op;
  fiber.line = line;
  fiber.calls++;
  fiber.f = f;
  fiber.u = u;
  emu::block(emu::Wait::simd);
  if (!is_float) {
    *u_out = emu::self().u;
  }
  return emu::self().f;
}

inline float simd_sum_at(int line, float x) {
  return simd_op(emu::Op::sum, line, x, 0, true, nullptr);
}

inline float simd_max_at(int line, float x) {
  return simd_op(emu::Op::max, line, x, 0, true, nullptr);
}

inline uint simd_min_at(int line, uint x) {
  uint out = 0;
  simd_op(emu::Op::min, line, 0, x, false, &out);
  return out;
}

}  // namespace metal

// Each call records its line in the kernel text, so threads at different calls never pair up
// (variadic: template arguments in the operand hold commas).
#define threadgroup_barrier(...) threadgroup_barrier_at(__LINE__, __VA_ARGS__)
#define simd_sum(...) simd_sum_at(__LINE__, __VA_ARGS__)
#define simd_max(...) simd_max_at(__LINE__, __VA_ARGS__)
#define simd_min(...) simd_min_at(__LINE__, __VA_ARGS__)
