// kernels.cu -- the CUDA microkernels of netmoe's hot path. Each op returns exactly (same dtype,
// same values, bit for bit) what its torch reference in netmoe.py returns:
//
//   count_tokens(route[I,S,K], E)              -> num[I,E] int64        netmoe.count_tokens (Eq. 2)
//   node_counts(route[I,S,K], expert_node, N)  -> nc[I,N] int64         netmoe.node_counts
//   dispatch_order(route, slot)                -> argsort(slot[route.reshape(-1)], stable=True)
//   gather_order(src, dest, I)                 -> argsort(dest[src] * I + src, stable=True)
//
// Built on first use by netmoe.hot_path("cuda"), i.e.
//   torch.utils.cpp_extension.load("netmoe_kernels", ["kernels.cu"], extra_cuda_cflags=["-O3"])
// which compiles for the visible GPU (or TORCH_CUDA_ARCH_LIST); needs sm_70+ (__match_any_sync).
// test_netmoe.py (section "kernels") compares every op with its reference on fresh random
// inputs; `python train_gpt.py bench kernels` times both.
//
// The two permutations are stable counting sorts: their keys are small integers (E experts or
// I samples), so three passes over the data beat a general radix sort. Past ~19k keys (the
// shared-memory budget of an H100/H200; fewer on older GPUs) they call torch's stable argsort.
//   1. sort_hist:  each tile of the input counts its keys                -> hist[t][b]
//   2. sort_scan:  per key, exclusive prefix over tiles; key totals       -> hist[t][b], total[b]
//   3. sort_place: each tile adds the exclusive scan of the totals and writes every element's
//      output position. Inside a tile each warp owns a contiguous run and ranks equal keys with
//      __match_any_sync in input order, so equal keys keep their order: the stable argsort.
// Ids are not range-checked against the tables (that would cost a device sync). An out-of-range
// id counts nowhere (count_tokens, node_counts; so does a node id outside [0, N)) or sorts as the
// last key (the sorts): wrong but never out of bounds, and the sorts still return a permutation.
#include <torch/extension.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>   // not ATen/cuda/CUDAContext.h: that one pulls in cuBLAS/cuSPARSE
#include <climits>

namespace {

constexpr int kThreads = 256;

cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream(); }

int device_attr(cudaDeviceAttr attr) {
  int v = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, attr, c10::cuda::current_device()));
  return v;
}

// Dynamic shared memory a sort block may take: what the device allows (48 KB to 227 KB), less
// room for the kernels' own static arrays.
int sort_smem_budget() { return device_attr(cudaDevAttrMaxSharedMemoryPerBlockOptin) - 1024; }

template <typename Kernel>
void allow_smem(Kernel kernel, int bytes) {
  if (bytes > 48 * 1024)
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
}

// Messages below hold no numbers: built against a subset of torch's headers (ATen + pybind only)
// on torch 2.11 / nvcc 13, formatting an integer into a TORCH_CHECK message crashed the process
// (SIGSEGV; strings, devices and dtypes were fine). Cause not established; the full
// torch/extension.h is used since.
void check_cuda_int(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kLong || t.scalar_type() == at::kInt, op, ": ", name,
              " must be int64 or int32, got ", t.scalar_type());
}

// Calls f(type_tag) with the C++ type of an int32 / int64 tensor.
template <typename F>
void with_int_type(const at::Tensor& t, F&& f) {
  if (t.scalar_type() == at::kLong) f(int64_t{}); else f(int32_t{});
}

// ------------------------------------------------------------------------------------------
// count_tokens (Eq. 2): a shared-memory histogram per (sample, chunk of its S*K ids).
// ------------------------------------------------------------------------------------------
constexpr int kCountChunk = 2048;   // ids per block: large samples are split so the grid fills the GPU

template <typename Id>
__global__ void count_tokens_kernel(const Id* __restrict__ route, int64_t per_sample, int chunks,
                                    int E, bool shared_hist, bool accumulate, int64_t* __restrict__ num) {
  extern __shared__ int hist[];
  const int64_t i = blockIdx.x / chunks;
  const int64_t lo = (blockIdx.x % chunks) * (int64_t)kCountChunk;
  const int64_t hi = min(per_sample, lo + kCountChunk);
  const Id* r = route + i * per_sample;
  unsigned long long* out = reinterpret_cast<unsigned long long*>(num + i * E);
  if (!shared_hist) {   // E too large for shared memory: count straight into num (zeroed)
    for (int64_t j = lo + threadIdx.x; j < hi; j += blockDim.x) {
      const int64_t e = r[j];
      if (e >= 0 && e < E) atomicAdd(out + e, 1ULL);
    }
    return;
  }
  for (int e = threadIdx.x; e < E; e += blockDim.x) hist[e] = 0;
  __syncthreads();
#pragma unroll 8
  for (int64_t j = lo + threadIdx.x; j < hi; j += blockDim.x) {
    const int64_t e = r[j];
    if (e >= 0 && e < E) atomicAdd(&hist[e], 1);
  }
  __syncthreads();
  for (int e = threadIdx.x; e < E; e += blockDim.x) {
    // two's complement: adding the unsigned count is the signed int64 sum
    if (!accumulate) num[i * E + e] = hist[e];
    else if (hist[e]) atomicAdd(out + e, (unsigned long long)hist[e]);
  }
}

at::Tensor count_tokens(at::Tensor route, int64_t num_experts) {
  check_cuda_int(route, "count_tokens", "route");
  TORCH_CHECK(route.dim() == 3, "count_tokens: route must be [I, S, K]");
  TORCH_CHECK(num_experts >= 0 && num_experts < INT_MAX, "count_tokens: num_experts out of range");
  const at::cuda::OptionalCUDAGuard guard(route.device());
  route = route.contiguous();   // the reference takes views too
  const int64_t I = route.size(0), per = route.size(1) * route.size(2);
  const int E = static_cast<int>(num_experts);
  const int64_t chunks = std::max<int64_t>(1, (per + kCountChunk - 1) / kCountChunk);
  TORCH_CHECK(I * chunks < INT_MAX, "count_tokens: route too large");
  const bool shared_hist = E * sizeof(int) <= 48 * 1024;
  const bool accumulate = chunks > 1 || !shared_hist;
  auto opts = route.options().dtype(at::kLong);
  at::Tensor num = accumulate ? at::zeros({I, E}, opts) : at::empty({I, E}, opts);
  if (I == 0 || E == 0) return num;
  if (per == 0) return num.zero_();
  with_int_type(route, [&](auto tag) {
    using Id = decltype(tag);
    count_tokens_kernel<Id><<<I * chunks, kThreads, shared_hist ? E * sizeof(int) : 0, stream()>>>(
        route.data_ptr<Id>(), per, (int)chunks, E, shared_hist, accumulate, num.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return num;
}

// ------------------------------------------------------------------------------------------
// node_counts: a shared-memory histogram over nodes per (sample, chunk of its tokens). A thread
// takes a token, maps its K experts to nodes and counts each node once: at its first k.
// ------------------------------------------------------------------------------------------
constexpr int kNodeChunk = 1024;   // tokens per block

template <typename Id>
__device__ __forceinline__ int node_of(const Id* __restrict__ ids, int k, const int64_t* __restrict__ expert_node,
                                       int E, int N) {
  const int64_t e = ids[k];
  if (e < 0 || e >= E) return -1;
  const int64_t n = expert_node[e];
  return (n >= 0 && n < N) ? (int)n : -1;
}

template <typename Id>
__global__ void node_counts_kernel(const Id* __restrict__ route, const int64_t* __restrict__ expert_node,
                                   int64_t S, int K, int chunks, int E, int N, bool shared_hist, bool accumulate,
                                   int64_t* __restrict__ nc) {
  extern __shared__ int hist[];
  const int64_t i = blockIdx.x / chunks;
  const int64_t lo = (blockIdx.x % chunks) * (int64_t)kNodeChunk;
  const int64_t hi = min(S, lo + kNodeChunk);
  unsigned long long* out = reinterpret_cast<unsigned long long*>(nc + i * N);
  if (shared_hist) {
    for (int n = threadIdx.x; n < N; n += blockDim.x) hist[n] = 0;
    __syncthreads();
  }
  for (int64_t s = lo + threadIdx.x; s < hi; s += blockDim.x) {
    const Id* ids = route + (i * S + s) * K;
    for (int k = 0; k < K; ++k) {
      const int n = node_of(ids, k, expert_node, E, N);
      bool first = n >= 0;
      for (int j = 0; j < k && first; ++j) first = node_of(ids, j, expert_node, E, N) != n;
      if (!first) continue;
      if (shared_hist) atomicAdd(&hist[n], 1);
      else atomicAdd(out + n, 1ULL);   // N too large for shared memory: count straight into nc (zeroed)
    }
  }
  if (!shared_hist) return;
  __syncthreads();
  for (int n = threadIdx.x; n < N; n += blockDim.x) {
    if (!accumulate) nc[i * N + n] = hist[n];
    else if (hist[n]) atomicAdd(out + n, (unsigned long long)hist[n]);
  }
}

at::Tensor node_counts(at::Tensor route, at::Tensor expert_node, int64_t nodes) {
  check_cuda_int(route, "node_counts", "route");
  TORCH_CHECK(route.dim() == 3, "node_counts: route must be [I, S, K]");
  TORCH_CHECK(expert_node.device() == route.device() && expert_node.scalar_type() == at::kLong &&
              expert_node.dim() == 1, "node_counts: expert_node must be an int64 tensor [E] on route's device");
  TORCH_CHECK(nodes >= 1 && nodes < INT_MAX, "node_counts: nodes out of range");
  TORCH_CHECK(expert_node.size(0) < INT_MAX && route.size(2) < INT_MAX, "node_counts: too many experts");
  const at::cuda::OptionalCUDAGuard guard(route.device());
  route = route.contiguous();
  expert_node = expert_node.contiguous();
  const int64_t I = route.size(0), S = route.size(1), K = route.size(2);
  const int N = static_cast<int>(nodes), E = static_cast<int>(expert_node.size(0));
  const int64_t chunks = std::max<int64_t>(1, (S + kNodeChunk - 1) / kNodeChunk);
  TORCH_CHECK(I * chunks < INT_MAX, "node_counts: route too large");
  const bool shared_hist = N * sizeof(int) <= 48 * 1024;
  const bool accumulate = chunks > 1 || !shared_hist;
  auto opts = route.options().dtype(at::kLong);
  at::Tensor nc = accumulate ? at::zeros({I, N}, opts) : at::empty({I, N}, opts);
  if (I == 0) return nc;
  if (S == 0 || K == 0) return nc.zero_();
  with_int_type(route, [&](auto tag) {
    using Id = decltype(tag);
    node_counts_kernel<Id><<<I * chunks, kThreads, shared_hist ? N * sizeof(int) : 0, stream()>>>(
        route.data_ptr<Id>(), expert_node.data_ptr<int64_t>(), S, (int)K, (int)chunks, E, N, shared_hist,
        accumulate, nc.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return nc;
}

// ------------------------------------------------------------------------------------------
// Stable counting sort of n elements by key table[id[i]] in [0, nb).
// ------------------------------------------------------------------------------------------
constexpr int kKeysPerLane = 16;   // ids a thread loads at once: enough loads in flight to hide latency

// The table, clamped into [0, nb), in shared memory: keys are looked up there, not in L1/L2.
template <typename Tab>
__device__ void load_table(const Tab* __restrict__ table, int nb, int* tab) {
  for (int b = threadIdx.x; b < nb; b += blockDim.x) {
    const int64_t k = table[b];
    tab[b] = (k >= 0 && k < nb) ? (int)k : nb - 1;
  }
}

// key[j] of element first + j * stride (-1 at or past hi); all loads are issued before any is used.
template <typename Id>
__device__ __forceinline__ void load_keys(const Id* __restrict__ id, const int* tab, int nb,
                                          int64_t first, int stride, int64_t hi, int (&key)[kKeysPerLane]) {
  int64_t x[kKeysPerLane];
#pragma unroll
  for (int j = 0; j < kKeysPerLane; ++j) x[j] = first + j * stride < hi ? (int64_t)id[first + j * stride] : 0;
#pragma unroll
  for (int j = 0; j < kKeysPerLane; ++j)
    key[j] = first + j * stride >= hi ? -1 : (x[j] >= 0 && x[j] < nb) ? tab[x[j]] : nb - 1;
}

// Tile t = elements [t * tile, (t + 1) * tile): hist[t][b] = how many of them have key b.
template <typename Id, typename Tab>
__global__ void sort_hist_kernel(const Id* __restrict__ id, const Tab* __restrict__ table, int64_t n,
                                 int nb, int tile, int* __restrict__ hist) {
  extern __shared__ int smem[];
  int* cnt = smem;        // [nb]
  int* tab = smem + nb;   // [nb]
  load_table(table, nb, tab);
  for (int b = threadIdx.x; b < nb; b += blockDim.x) cnt[b] = 0;
  __syncthreads();
  const int64_t lo = (int64_t)blockIdx.x * tile, hi = min(n, lo + tile);
  for (int64_t i0 = lo; i0 < hi; i0 += (int64_t)kKeysPerLane * blockDim.x) {
    int key[kKeysPerLane];
    load_keys(id, tab, nb, i0 + threadIdx.x, blockDim.x, hi, key);
#pragma unroll
    for (int j = 0; j < kKeysPerLane; ++j)
      if (key[j] >= 0) atomicAdd(&cnt[key[j]], 1);
  }
  __syncthreads();
  for (int b = threadIdx.x; b < nb; b += blockDim.x) hist[(int64_t)blockIdx.x * nb + b] = cnt[b];
}

// In place: hist[t][b] -> sum of hist[t'][b] over t' < t; total[b] = sum over all t. A block
// takes 32 keys (coalesced rows) x 32 runs of tiles, so the tiles' prefix costs few round trips.
__global__ void sort_scan_kernel(int* __restrict__ hist, int tiles, int nb, int* __restrict__ total) {
  __shared__ int part[32][33];
  const int b = blockIdx.x * 32 + threadIdx.x, y = threadIdx.y;
  const int per = (tiles + 31) / 32, t0 = min(tiles, y * per), t1 = min(tiles, t0 + per);
  int s = 0;
  if (b < nb)
    for (int t = t0; t < t1; ++t) s += hist[(int64_t)t * nb + b];
  part[y][threadIdx.x] = s;
  __syncthreads();
  int run = 0;
  for (int k = 0; k < y; ++k) run += part[k][threadIdx.x];
  if (b >= nb) return;
  for (int t = t0; t < t1; ++t) {
    const int v = hist[(int64_t)t * nb + b];
    hist[(int64_t)t * nb + b] = run;
    run += v;
  }
  if (y == 31) total[b] = run;
}

// dst[0..n) = exclusive prefix sum of src[0..n), by the whole block (dst in shared memory).
__device__ void block_exclusive_scan(const int* __restrict__ src, int n, int* dst) {
  __shared__ int warp_sum[32];
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, warps = blockDim.x >> 5;
  for (int b = threadIdx.x; b < n; b += blockDim.x) dst[b] = src[b];
  __syncthreads();
  const int per = (n + blockDim.x - 1) / blockDim.x;
  const int lo = min(n, (int)threadIdx.x * per), hi = min(n, lo + per);
  int s = 0;
  for (int b = lo; b < hi; ++b) s += dst[b];
  int x = s;   // inclusive scan of the threads' sums: in the warp, then over warps
  for (int d = 1; d < 32; d <<= 1) {
    const int y = __shfl_up_sync(0xffffffffu, x, d);
    if (lane >= d) x += y;
  }
  if (lane == 31) warp_sum[w] = x;
  __syncthreads();
  if (w == 0) {
    int v = lane < warps ? warp_sum[lane] : 0;
    for (int d = 1; d < 32; d <<= 1) {
      const int y = __shfl_up_sync(0xffffffffu, v, d);
      if (lane >= d) v += y;
    }
    warp_sum[lane] = v;
  }
  __syncthreads();
  int run = x - s + (w ? warp_sum[w - 1] : 0);
  for (int b = lo; b < hi; ++b) {
    const int v = dst[b];
    dst[b] = run;
    run += v;
  }
  __syncthreads();
}

// Block t places tile t: warp w owns the `run` elements from t * tile + w * run on, in order.
template <typename Id, typename Tab>
__global__ void sort_place_kernel(const Id* __restrict__ id, const Tab* __restrict__ table, int64_t n,
                                  int nb, int run, const int* __restrict__ hist,
                                  const int* __restrict__ total, int64_t* __restrict__ out) {
  extern __shared__ int smem[];
  int* base = smem;          // [nb]: first output position of key b in this tile
  int* tab = smem + nb;      // [nb]: the key table
  int* cur = smem + 2 * nb;  // [warps][nb]: next output position of key b for warp w
  const int warps = blockDim.x >> 5, w = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t lo = (int64_t)blockIdx.x * warps * run + (int64_t)w * run;
  const int64_t hi = min(n, lo + run);
  load_table(table, nb, tab);
  for (int b = threadIdx.x; b < warps * nb; b += blockDim.x) cur[b] = 0;
  block_exclusive_scan(total, nb, base);   // has barriers: tab and cur are ready after it too
  for (int b = threadIdx.x; b < nb; b += blockDim.x) base[b] += hist[(int64_t)blockIdx.x * nb + b];
  int* mine = cur + w * nb;
  for (int64_t i0 = lo; i0 < hi; i0 += 32 * kKeysPerLane) {   // count this warp's keys
    int key[kKeysPerLane];
    load_keys(id, tab, nb, i0 + lane, 32, hi, key);
#pragma unroll
    for (int j = 0; j < kKeysPerLane; ++j)
      if (key[j] >= 0) atomicAdd(&mine[key[j]], 1);
  }
  __syncthreads();
  for (int b = threadIdx.x; b < nb; b += blockDim.x) {   // warps' runs follow each other
    int pos = base[b];
    for (int v = 0; v < warps; ++v) {
      const int c = cur[v * nb + b];
      cur[v * nb + b] = pos;
      pos += c;
    }
  }
  __syncthreads();
  const unsigned lower = (1u << lane) - 1;
  for (int64_t i0 = lo; i0 < hi; i0 += 32 * kKeysPerLane) {
    int key[kKeysPerLane];
    load_keys(id, tab, nb, i0 + lane, 32, hi, key);
#pragma unroll
    for (int j = 0; j < kKeysPerLane; ++j) {   // 32 elements a step; lane order = input order
      const int k = key[j];
      const unsigned peers = __match_any_sync(0xffffffffu, k);
      const int pos = k >= 0 ? mine[k] + __popc(peers & lower) : 0;
      __syncwarp();
      if (k >= 0 && (peers & lower) == 0) mine[k] += __popc(peers);   // first of its key in the step
      __syncwarp();
      if (k >= 0) out[pos] = i0 + j * 32 + lane;
    }
  }
}

// Warps of sort_place for nb keys within the shared-memory budget; 0: too many keys.
int sort_warps(int nb) { return std::max(0, std::min(8, sort_smem_budget() / (int)sizeof(int) / nb - 2)); }

// out = torch.argsort(table[id], stable=True), for sort_warps(nb) > 0.
template <typename Id, typename Tab>
void counting_sort(const Id* id, const Tab* table, int64_t n, int nb, int64_t* out,
                   const at::TensorOptions& int_opts) {
  const int warps = sort_warps(nb);
  // About two tiles per SM (fewer when nb is large, to bound hist at ~1M entries); a warp's run
  // is a multiple of 32 so a step never straddles two warps.
  const int64_t target = std::max<int64_t>(1, std::min<int64_t>(2 * device_attr(cudaDevAttrMultiProcessorCount),
                                                                (1 << 20) / nb));
  const int64_t per_warp = (n + target * warps - 1) / (target * warps);
  const int64_t run64 = std::max<int64_t>(32, (per_warp + 31) / 32 * 32);
  TORCH_CHECK(run64 * warps < INT_MAX, "counting sort: input too large");
  const int run = (int)run64, tile = run * warps;
  const int64_t tiles = (n + tile - 1) / tile;
  auto hist = at::empty({tiles * nb + nb}, int_opts);
  int* total = hist.data_ptr<int>() + tiles * nb;
  const int hist_smem = 2 * nb * sizeof(int);
  allow_smem(sort_hist_kernel<Id, Tab>, hist_smem);
  sort_hist_kernel<Id, Tab><<<tiles, kThreads, hist_smem, stream()>>>(id, table, n, nb, tile, hist.data_ptr<int>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  sort_scan_kernel<<<(nb + 31) / 32, dim3(32, 32), 0, stream()>>>(hist.data_ptr<int>(), (int)tiles, nb, total);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int place_smem = (warps + 2) * nb * sizeof(int);
  allow_smem(sort_place_kernel<Id, Tab>, place_smem);
  sort_place_kernel<Id, Tab><<<tiles, warps * 32, place_smem, stream()>>>(id, table, n, nb, run,
                                                                          hist.data_ptr<int>(), total, out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor dispatch_order(at::Tensor route, at::Tensor slot) {
  check_cuda_int(route, "dispatch_order", "route");
  check_cuda_int(slot, "dispatch_order", "slot");
  TORCH_CHECK(slot.dim() == 1 && slot.device() == route.device(),
              "dispatch_order: slot must be 1-D on route's device");
  const at::cuda::OptionalCUDAGuard guard(route.device());
  route = route.contiguous();
  slot = slot.contiguous();
  const int64_t n = route.numel(), E = slot.numel();
  auto out = at::empty({n}, route.options().dtype(at::kLong));
  if (n == 0) return out;
  TORCH_CHECK(E > 0, "dispatch_order: slot is empty but route is not");
  TORCH_CHECK(n < INT_MAX, "dispatch_order: more than 2^31 - 1 rows");
  if (E >= INT_MAX || sort_warps((int)E) == 0) return at::argsort(slot.index({route.reshape(-1)}), /*stable=*/true);
  with_int_type(route, [&](auto id_tag) {
    with_int_type(slot, [&](auto tab_tag) {
      using Id = decltype(id_tag);
      using Tab = decltype(tab_tag);
      counting_sort<Id, Tab>(route.data_ptr<Id>(), slot.data_ptr<Tab>(), n, (int)E,
                             out.data_ptr<int64_t>(), route.options().dtype(at::kInt));
    });
  });
  return out;
}

// ------------------------------------------------------------------------------------------
// gather_order: rows are sorted by (dest[src], src). Rank the I samples once by that key, then
// counting-sort the rows by rank[src], which orders them identically and keeps ties stable.
// ------------------------------------------------------------------------------------------
// rank[p] = #{q : key(q) < key(p)}, key(p) = dest[p] * I + p: the keys are distinct (p is in
// them), so this is the position of p in their sort. O(I^2) comparisons, I = the global batch
// in samples (hundreds to a few thousand): a block ranks 32 samples (one a lane), its 8 warps
// split the q; every lane of a warp reads the same dest[q], a broadcast.
__global__ void sample_rank_kernel(const int64_t* __restrict__ dest, int64_t I, int* __restrict__ rank) {
  __shared__ int part[8][32];
  // the reference's int64 arithmetic, wrapping included
  auto key = [&](int64_t p) { return (int64_t)((uint64_t)dest[p] * (uint64_t)I + (uint64_t)p); };
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
  const int64_t p = (int64_t)blockIdx.x * 32 + lane;
  const int64_t kp = p < I ? key(p) : 0;
  int r = 0;
#pragma unroll 8
  for (int64_t q = w; q < I; q += 8) r += key(q) < kp;
  part[w][lane] = r;
  __syncthreads();
  if (w || p >= I) return;
  for (int v = 1; v < 8; ++v) r += part[v][lane];
  rank[p] = r;
}

at::Tensor gather_order(at::Tensor src, at::Tensor dest, int64_t num_samples) {
  check_cuda_int(src, "gather_order", "src");
  TORCH_CHECK(dest.device() == src.device() && dest.scalar_type() == at::kLong && dest.dim() == 1,
              "gather_order: dest must be an int64 tensor [num_samples] on src's device");
  TORCH_CHECK(dest.size(0) == num_samples, "gather_order: dest must have num_samples entries");
  TORCH_CHECK(src.dim() == 1, "gather_order: src must be 1-D");
  const at::cuda::OptionalCUDAGuard guard(src.device());
  src = src.contiguous();
  dest = dest.contiguous();
  const int64_t n = src.numel(), I = num_samples;
  auto out = at::empty({n}, src.options().dtype(at::kLong));
  if (n == 0) return out;
  TORCH_CHECK(I > 0, "gather_order: num_samples is 0 but src is not empty");
  TORCH_CHECK(n < INT_MAX, "gather_order: more than 2^31 - 1 rows");
  if (I >= INT_MAX || sort_warps((int)I) == 0) return at::argsort(dest.index({src}) * I + src, /*stable=*/true);
  auto int_opts = src.options().dtype(at::kInt);
  auto rank = at::empty({I}, int_opts);
  sample_rank_kernel<<<(I + 31) / 32, 256, 0, stream()>>>(dest.data_ptr<int64_t>(), I, rank.data_ptr<int>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  with_int_type(src, [&](auto tag) {
    using Id = decltype(tag);
    counting_sort<Id, int>(src.data_ptr<Id>(), rank.data_ptr<int>(), n, (int)I, out.data_ptr<int64_t>(), int_opts);
  });
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "netmoe's CUDA hot path; each op equals its torch reference in netmoe.py";
  m.def("count_tokens", &count_tokens, "num[I,E]: (token, k) pairs of sample i routed to expert e (Eq. 2)",
        py::arg("route"), py::arg("num_experts"));
  m.def("node_counts", &node_counts, "nc[I,N]: tokens of sample i with at least one of their K experts on node n",
        py::arg("route"), py::arg("expert_node"), py::arg("nodes"));
  m.def("dispatch_order", &dispatch_order, "torch.argsort(slot[route.reshape(-1)], stable=True)",
        py::arg("route"), py::arg("slot"));
  m.def("gather_order", &gather_order, "torch.argsort(dest[src] * num_samples + src, stable=True)",
        py::arg("src"), py::arg("dest"), py::arg("num_samples"));
}
