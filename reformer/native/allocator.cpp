// A caching CPU allocator for torch: every tensor of 1 MiB or more comes from one pool of
// address space that keeps what is freed, resident, for the next tensor. See allocator.py.
//
// glibc's malloc either maps fresh pages for each large block (a page fault per 4 KiB, every
// step) or, told to keep its heap, lets small allocations settle in the holes that freed
// tensors leave, so the next tensor of the same size no longer fits and the heap grows: three
// times the live memory of a ReformerLM step at 8K-32K tokens. The pool holds large blocks only:
// best fit over its free ranges, neighbours merged on free, so the pool stays close to the
// step's peak of live tensors. It is one reservation of address space (no memory is committed
// until touched), advised for transparent huge pages, so a first touch maps 2 MiB at once.
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/util/Exception.h>
#include <pthread.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <iterator>
#include <map>
#include <set>
#include <unordered_map>
#include <utility>

namespace {

constexpr size_t kPooled = size_t(1) << 20;  // blocks from this size come from the pool
constexpr size_t kGrain = size_t(4) << 10;  // pooled sizes are rounded up to 4 KiB (not more: blocks
                                             // at 64 KiB multiples share cache sets; an 8K LM step ran 7% slower)
constexpr size_t kHugePage = size_t(2) << 20;
constexpr size_t kAlignment = 64;  // as torch's default allocator (AVX-512 loads)

pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;

struct Locked {  // holds ``lock`` for its scope (released when a map insertion throws, too)
  Locked() { pthread_mutex_lock(&lock); }
  ~Locked() { pthread_mutex_unlock(&lock); }
};

struct Pool {
  char* base = nullptr;
  size_t reserved = 0;
  size_t top = 0;  // below: blocks in use and free ranges; from here up, never handed out
  size_t high_water = 0;  // the highest ``top`` so far: what the pool has touched
  size_t in_use = 0;
  std::map<size_t, size_t> free_at;             // offset -> size of each free range (none touches top)
  std::set<std::pair<size_t, size_t>> by_size;  // (size, offset) of the same ranges
  std::unordered_map<size_t, size_t> used;      // offset -> size of each block in use

  bool owns(const void* p) const {
    auto c = static_cast<const char*>(p);
    return base != nullptr && c >= base && c < base + reserved;
  }

  void add_free(size_t offset, size_t size) {
    free_at.emplace(offset, size);
    by_size.emplace(size, offset);
  }

  void drop_free(std::map<size_t, size_t>::iterator it) {
    by_size.erase({it->second, it->first});
    free_at.erase(it);
  }

  // The smallest free range that holds ``size`` (the lowest such on ties), else the top.
  void* take(size_t size) {
    size_t offset;
    auto fit = by_size.lower_bound({size, 0});
    if (fit != by_size.end()) {
      auto [range, at] = *fit;
      drop_free(free_at.find(at));
      if (range > size) add_free(at + size, range - size);
      offset = at;
    } else {
      if (top + size > reserved) return nullptr;
      offset = top;
      top += size;
      if (top > high_water) high_water = top;
    }
    used.emplace(offset, size);
    in_use += size;
    return base + offset;
  }

  void give(void* p) {
    auto block = used.find(static_cast<char*>(p) - base);
    size_t offset = block->first, size = block->second;
    used.erase(block);
    in_use -= size;
    auto next = free_at.lower_bound(offset);
    if (next != free_at.end() && next->first == offset + size) {  // merge the range after
      size += next->second;
      drop_free(next);
    }
    auto after = free_at.lower_bound(offset);
    if (after != free_at.begin()) {  // merge the range before
      auto prev = std::prev(after);
      if (prev->first + prev->second == offset) {
        offset = prev->first;
        size += prev->second;
        drop_free(prev);
      }
    }
    if (offset + size == top) {
      top = offset;  // the pages stay resident for the next blocks from the top
    } else {
      add_free(offset, size);
    }
  }
};

Pool pool;

void release(void* p) {
  if (!pool.owns(p)) {
    std::free(p);
    return;
  }
  Locked held;
  pool.give(p);
}

struct CachingCPUAllocator final : c10::Allocator {
  c10::DataPtr allocate(size_t n) override {
    void* p = nullptr;
    if (n >= kPooled) {
      size_t size = (n + kGrain - 1) / kGrain * kGrain;
      Locked held;
      p = pool.take(size);
    }
    if (p == nullptr && n > 0 && posix_memalign(&p, kAlignment, n) != 0) {  // small, or the pool is full
      TORCH_CHECK_WITH(OutOfMemoryError, false, "CPU allocator: not enough memory: you tried to allocate ", n,
                       " bytes.");  // (torch.OutOfMemoryError in Python, as from torch's own allocator)
    }
    return {p, p, &release, c10::Device(c10::DeviceType::CPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override {
    return &release;
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

CachingCPUAllocator allocator;

// A child forked while another thread held the lock would wait on it forever.
void before_fork() {
  pthread_mutex_lock(&lock);
}
void after_fork() {
  pthread_mutex_unlock(&lock);
}

}  // namespace

extern "C" {

// Reserves up to ``bytes`` of address space (half as much, and so on down to 1 GiB, where a limit
// on the process's data or address space refuses more) and makes the pool torch's CPU
// allocator. 1: installed (now or before), 0: nothing could be reserved or another allocator
// of higher priority is installed.
int reformer_install_cpu_allocator(size_t bytes) {
  Locked held;
  if (pool.base != nullptr) return c10::GetCPUAllocator() == &allocator;
  void* region = MAP_FAILED;
  size_t size = (bytes + kHugePage - 1) / kHugePage * kHugePage;
  for (; size >= (size_t(1) << 30); size = size / 2 / kHugePage * kHugePage) {
    region = mmap(nullptr, size + kHugePage, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (region != MAP_FAILED) break;
  }
  if (region == MAP_FAILED) return 0;
  auto start = (reinterpret_cast<uintptr_t>(region) + kHugePage - 1) / kHugePage * kHugePage;
  pool.base = reinterpret_cast<char*>(start);  // 2 MiB aligned, so huge pages line up with it
  pool.reserved = size;
#ifdef MADV_HUGEPAGE
  madvise(pool.base, size, MADV_HUGEPAGE);  // (refused where the kernel has no THP: 4 KiB pages then)
#endif
  pthread_atfork(before_fork, after_fork, after_fork);
  c10::SetCPUAllocator(&allocator, /*priority=*/1);
  return c10::GetCPUAllocator() == &allocator;
}

// Bytes of pooled blocks in use, and of the pool's address space touched so far (resident).
void reformer_cpu_allocator_stats(size_t* in_use, size_t* touched) {
  Locked held;
  *in_use = pool.in_use;
  *touched = pool.high_water;
}

}  // extern "C"
