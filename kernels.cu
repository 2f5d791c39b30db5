// kernels.cu -- the CUDA microkernels of netmoe's hot path. Each op returns exactly (same dtype,
// same values, bit for bit) what its torch reference in netmoe.py returns:
//
//   count_tokens(route[I,S,K], E)              -> num[I,E] int64        netmoe.count_tokens (Eq. 2)
//   node_counts(route[I,S,K], expert_node, N)  -> nc[I,N] int64         netmoe.node_counts
//   dispatch_order(route, slot)                -> argsort(slot[route.reshape(-1)], stable=True)
//   gather_order(src, dest, I)                 -> argsort(dest[src] * I + src, stable=True)
//
// and the rows' bytes, equal to their references up to the order of float additions (they
// accumulate in float32, float64 for float64 rows):
//
//   permute_rows(x[T,C], src[R])               -> x[src]                    dispatch's copy
//   combine(rows, index[Q,k], weight, bias, ends, base, base_scale, perm, seq)
//                                              -> out[Q,C]                  netmoe.combine
//   combine_backward(grad, rows, index, ...)   -> grad_rows, grad_weight, grad_base
//   bias_gelu(pre[R,F], bias[E,F], ends[E])    -> GELU(pre + bias[expert of row])
//   bias_gelu_backward(grad, pre, bias, ends)  -> grad_pre, grad_bias[E,F]
//   segment_sum(x[R,C], ends[E])               -> [E,C] sums of each expert's rows
//
// and the gate's choice, exactly (int64, bit for bit):
//
//   topk_ids(scores[...,E], k, affine)         -> sort(scores, descending, stable)[1][..., :k], of
//                                                 rstd (scores - mean u) + c where affine is given
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

// ------------------------------------------------------------------------------------------
// Rows: dispatch's copy, combine and the experts' epilogue, forward and backward. Rows are
// [n, C] row-major with any row stride; each warp moves whole rows in 16-byte packs where the
// row width, the strides and the pointers allow (else one element a lane), accumulating in
// float32 (float64 for float64 rows). No atomics: every output element has one writer, so the
// results are the same bits on every run.
//   ends[E] (int32): rows of expert e are [ends[e - 1], ends[e]) -- the grouped product's offsets.
// ------------------------------------------------------------------------------------------
template <typename T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };

template <typename T, int V> struct alignas(sizeof(T) * V) Pack { T v[V]; };

template <int V, typename T, typename A>
__device__ __forceinline__ void load_acc(const T* p, A (&a)[V]) {
  const Pack<T, V> pk = *reinterpret_cast<const Pack<T, V>*>(p);
#pragma unroll
  for (int i = 0; i < V; ++i) a[i] = static_cast<A>(pk.v[i]);
}

template <int V, typename T, typename A>
__device__ __forceinline__ void store_acc(T* p, const A (&a)[V]) {
  Pack<T, V> pk;
#pragma unroll
  for (int i = 0; i < V; ++i) pk.v[i] = static_cast<T>(a[i]);
  *reinterpret_cast<Pack<T, V>*>(p) = pk;
}

constexpr unsigned kFull = 0xffffffffu;

template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int d = 16; d; d >>= 1) v += __shfl_xor_sync(kFull, v, d);
  return v;
}

// The expert of row r: the first e with ends[e] > r (clamped: a row past the last is the last's).
__device__ __forceinline__ int expert_of(const int* __restrict__ ends, int E, int64_t r) {
  int lo = 0, hi = E;
  while (lo < hi) {
    const int mid = (lo + hi) >> 1;
    if (ends[mid] > r) hi = mid; else lo = mid + 1;
  }
  return min(lo, E - 1);
}

// GELU(z) = z * Phi(z), exact (erf), as torch's default; and its derivative Phi(z) + z * phi(z).
__device__ __forceinline__ float gelu(float z) { return 0.5f * z * (1.f + erff(z * 0.70710678118654752f)); }
__device__ __forceinline__ double gelu(double z) { return 0.5 * z * (1. + erf(z * 0.70710678118654752)); }
__device__ __forceinline__ float gelu_grad(float z) {
  return 0.5f * (1.f + erff(z * 0.70710678118654752f)) + z * 0.39894228040143268f * expf(-0.5f * z * z);
}
__device__ __forceinline__ double gelu_grad(double z) {
  return 0.5 * (1. + erf(z * 0.70710678118654752)) + z * 0.39894228040143268 * exp(-0.5 * z * z);
}

constexpr int kRowWarps = 8;   // warps (rows) a block of the row kernels

int64_t row_blocks(int64_t rows) { return (rows + kRowWarps - 1) / kRowWarps; }

// out[r] = x[src[r]]; a source id outside [0, T) gives a zero row.
template <typename T, int V>
__global__ void permute_rows_kernel(const T* __restrict__ x, int64_t ld, int64_t T_, const int64_t* __restrict__ src,
                                    int64_t R, int64_t C, T* __restrict__ out) {
  const int64_t r = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (r >= R) return;
  const int64_t s = src[r];
  for (int64_t c = (int64_t)lane * V; c < C; c += 32 * V) {
    using A = typename AccOf<T>::type;
    A v[V];
    if (s >= 0 && s < T_) load_acc<V>(x + s * ld + c, v);
    else for (int i = 0; i < V; ++i) v[i] = 0;
    store_acc<V>(out + r * C + c, v);
  }
}

// Output row q holds token t = perm[q / seq] * seq + q % seq (t = q without perm):
// out[q] = base_scale[t] * base[t] + sum_j weight[t, j] * (rows[index[t, j]] + bias[expert of that row]).
// A warp per output row; lane j < 32 holds choice j's row, weight and expert, broadcast to all.
template <typename T, int V>
__global__ void combine_kernel(const T* __restrict__ rows, int64_t ld_rows, int64_t R, const int64_t* __restrict__ index,
                               int Kc, const typename AccOf<T>::type* __restrict__ weight, const T* __restrict__ bias,
                               const int* __restrict__ ends, int E, const T* __restrict__ base, int64_t ld_base,
                               const typename AccOf<T>::type* __restrict__ base_scale,
                               const int64_t* __restrict__ perm, int64_t seq, int64_t Q, int64_t C,
                               T* __restrict__ out) {
  using A = typename AccOf<T>::type;
  const int64_t q = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (q >= Q) return;   // whole warps leave: the shuffles below see every lane
  const int64_t t = perm ? perm[q / seq] * seq + q % seq : q;
  int64_t my_row = -1;
  A my_w = 1;
  int my_e = 0;
  if (lane < Kc) {
    my_row = index[t * Kc + lane];
    if (my_row >= R) my_row = -1;
    if (weight) my_w = weight[t * Kc + lane];
    if (bias && my_row >= 0) my_e = expert_of(ends, E, my_row);
  }
  const A scale = base_scale ? base_scale[t] : A(1);
  for (int64_t c0 = 0; c0 < C; c0 += 32 * V) {
    const int64_t c = c0 + (int64_t)lane * V;
    const bool on = c < C;
    A acc[V];
    if (base && on) {
      load_acc<V>(base + t * ld_base + c, acc);
#pragma unroll
      for (int i = 0; i < V; ++i) acc[i] *= scale;
    } else {
#pragma unroll
      for (int i = 0; i < V; ++i) acc[i] = 0;
    }
    for (int j = 0; j < Kc; ++j) {
      int64_t row;
      A w;
      int e = 0;
      if (j < 32) {
        row = __shfl_sync(kFull, my_row, j);
        w = __shfl_sync(kFull, my_w, j);
        e = __shfl_sync(kFull, my_e, j);
      } else {   // beyond 32 choices (no bias there): straight from memory, the same address in every lane
        row = index[t * Kc + j];
        if (row >= R) row = -1;
        w = weight ? weight[t * Kc + j] : A(1);
      }
      if (row < 0 || !on) continue;
      A r[V];
      load_acc<V>(rows + row * ld_rows + c, r);
      if (bias) {
        A b[V];
        load_acc<V>(bias + (int64_t)e * C + c, b);
#pragma unroll
        for (int i = 0; i < V; ++i) r[i] += b[i];
      }
#pragma unroll
      for (int i = 0; i < V; ++i) acc[i] += w * r[i];
    }
    if (on) store_acc<V>(out + q * C + c, acc);
  }
}

// The backward of combine, a warp per output row q (token t): grad_base[t] = base_scale[t] * g,
// grad_rows[index[t, j]] = weight[t, j] * g, grad_weight[t, j] = <g, rows[index[t, j]] + bias>,
// g = grad_out[q]. The row g is read once per choice, from L1 after the first.
template <typename T, int V>
__global__ void combine_backward_kernel(const T* __restrict__ grad, int64_t ld_grad, const T* __restrict__ rows,
                                        int64_t ld_rows, int64_t R, const int64_t* __restrict__ index, int Kc,
                                        const typename AccOf<T>::type* __restrict__ weight, const T* __restrict__ bias,
                                        const int* __restrict__ ends, int E,
                                        const typename AccOf<T>::type* __restrict__ base_scale,
                                        const int64_t* __restrict__ perm, int64_t seq, int64_t Q, int64_t C,
                                        T* __restrict__ grad_rows, typename AccOf<T>::type* __restrict__ grad_weight,
                                        T* __restrict__ grad_base) {
  using A = typename AccOf<T>::type;
  const int64_t q = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (q >= Q) return;
  const int64_t t = perm ? perm[q / seq] * seq + q % seq : q;
  const T* g = grad + q * ld_grad;
  if (grad_base) {
    const A scale = base_scale ? base_scale[t] : A(1);
    for (int64_t c = (int64_t)lane * V; c < C; c += 32 * V) {
      A v[V];
      load_acc<V>(g + c, v);
#pragma unroll
      for (int i = 0; i < V; ++i) v[i] *= scale;
      store_acc<V>(grad_base + t * C + c, v);
    }
  }
  for (int j = 0; j < Kc; ++j) {
    int64_t row = index[t * Kc + j];
    if (row >= R) row = -1;
    const A w = weight ? weight[t * Kc + j] : A(1);
    const int e = bias && row >= 0 ? expert_of(ends, E, row) : 0;
    A dot = 0;
    if (row >= 0) {
      for (int64_t c = (int64_t)lane * V; c < C; c += 32 * V) {
        A v[V], o[V];
        load_acc<V>(g + c, v);
#pragma unroll
        for (int i = 0; i < V; ++i) o[i] = w * v[i];
        store_acc<V>(grad_rows + row * C + c, o);
        if (grad_weight) {
          A r[V];
          load_acc<V>(rows + row * ld_rows + c, r);
          if (bias) {
            A b[V];
            load_acc<V>(bias + (int64_t)e * C + c, b);
#pragma unroll
            for (int i = 0; i < V; ++i) r[i] += b[i];
          }
#pragma unroll   // each product rounded to T, as autograd rounds those of a bf16 weight * rows
          for (int i = 0; i < V; ++i) dot += static_cast<A>(static_cast<T>(r[i] * v[i]));
        }
      }
    }
    if (grad_weight) {   // row is the same in every lane: all reach the shuffles
      dot = warp_sum(dot);
      if (lane == 0) grad_weight[t * Kc + j] = dot;
    }
  }
}

// out[r] = GELU(pre[r] + bias[expert of r]): the first product's epilogue, a warp per row.
template <typename T, int V>
__global__ void bias_gelu_kernel(const T* __restrict__ pre, int64_t ld, int64_t R, int64_t C, const T* __restrict__ bias,
                                 const int* __restrict__ ends, int E, T* __restrict__ out) {
  using A = typename AccOf<T>::type;
  const int64_t r = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (r >= R) return;
  const T* b = bias + (int64_t)expert_of(ends, E, r) * C;
#pragma unroll 4   // several packs' loads in flight
  for (int64_t c = (int64_t)lane * V; c < C; c += 32 * V) {
    A z[V], bb[V];
    load_acc<V>(pre + r * ld + c, z);
    load_acc<V>(b + c, bb);
#pragma unroll
    for (int i = 0; i < V; ++i) z[i] = gelu(z[i] + bb[i]);
    store_acc<V>(out + r * C + c, z);
  }
}

// Sums over each expert's rows, deterministic and without atomics: chunk k of kSegRows rows
// writes the sum of its rows of expert e to partial[k + e] (k and e only grow along the rows, so
// no two (chunk, expert) pairs share a slot), and segment_reduce adds expert e's chunks in order.
// With GELU, the rows summed are GELU's backward, grad * GELU'(pre + bias[e]), written to
// grad_pre on the way: the bias gradient costs no pass of its own.
constexpr int kSegRows = 64;

template <typename T, int V, bool GELU>
__global__ void segment_partial_kernel(const T* __restrict__ x, int64_t ld, const T* __restrict__ pre,
                                       const T* __restrict__ bias, const int* __restrict__ ends, int E, int64_t R,
                                       int64_t C, T* __restrict__ grad_pre, typename AccOf<T>::type* __restrict__ partial) {
  using A = typename AccOf<T>::type;
  const int64_t k = blockIdx.x;
  const int64_t c = ((int64_t)blockIdx.y * blockDim.x + threadIdx.x) * V;
  if (c >= C) return;
  int64_t r = k * kSegRows;
  const int64_t r1 = min(R, r + kSegRows);
  int e = expert_of(ends, E, r);
  while (r < r1 && ends[e] > r) {
    const int64_t stop = min(r1, (int64_t)ends[e]);
    A b[V], sum[V];
#pragma unroll
    for (int i = 0; i < V; ++i) sum[i] = 0;
    if (GELU) load_acc<V>(bias + (int64_t)e * C + c, b);
    for (; r < stop; r += 2) {   // two rows a step: both rows' loads in flight before either is used
      const bool two = r + 1 < stop;
      A v[2][V], p[2][V];
#pragma unroll
      for (int u = 0; u < 2; ++u)
        if (u == 0 || two) {
          load_acc<V>(x + (r + u) * ld + c, v[u]);
          if (GELU) load_acc<V>(pre + (r + u) * C + c, p[u]);
        }
#pragma unroll
      for (int u = 0; u < 2; ++u) {
        if (u == 1 && !two) break;
        if (GELU) {
#pragma unroll
          for (int i = 0; i < V; ++i) v[u][i] *= gelu_grad(p[u][i] + b[i]);
          store_acc<V>(grad_pre + (r + u) * C + c, v[u]);
        }
#pragma unroll
        for (int i = 0; i < V; ++i) sum[i] += v[u][i];
      }
    }
    r = stop;
    A* dst = partial + (k + e) * C + c;
#pragma unroll
    for (int i = 0; i < V; ++i) dst[i] = sum[i];
    while (e < E - 1 && ends[e] <= r) ++e;
  }
}

template <typename A>
__global__ void segment_reduce_kernel(const A* __restrict__ partial, const int* __restrict__ ends, int64_t C,
                                      A* __restrict__ out) {
  const int e = blockIdx.y;
  const int64_t c = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= C) return;
  const int64_t lo = e ? ends[e - 1] : 0, hi = ends[e];
  A s = 0;
  if (hi > lo)
    for (int64_t k = lo / kSegRows; k <= (hi - 1) / kSegRows; ++k) s += partial[(k + e) * C + c];
  out[(int64_t)e * C + c] = s;
}

// ---- host side of the row kernels

void check_rows(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got ", t.device());
  TORCH_CHECK(t.is_floating_point(), op, ": ", name, " must be floating point, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 2, op, ": ", name, " must be 2-D rows [n, C]");
}

// Rows with unit column stride (a view of wider rows keeps its row stride); anything else is copied.
at::Tensor unit_cols(const at::Tensor& t) { return t.size(1) <= 1 || t.stride(1) == 1 ? t : t.contiguous(); }

int64_t ld_of(const at::Tensor& t) { return t.size(0) > 1 ? t.stride(0) : t.size(1); }

// Whether C columns move in 16-byte packs: C, every row stride and every pointer in step.
bool packs_fit(int64_t C, size_t elt, std::initializer_list<std::pair<const void*, int64_t>> ptrs) {
  const int64_t V = 16 / (int64_t)elt;
  if (V <= 1 || C % V) return V == 1 && C >= 0;
  for (const auto& [p, ld] : ptrs)
    if (p && ((reinterpret_cast<uintptr_t>(p) % 16) || ld % V)) return false;
  return true;
}

// Calls f with std::integral_constant<int, V>: V = 16 / sizeof(T) where the packs fit, else 1.
template <typename T, typename F>
void with_pack(bool fit, F&& f) {
  if (fit) f(std::integral_constant<int, 16 / (int)sizeof(T)>{});
  else f(std::integral_constant<int, 1>{});
}

#define NETMOE_DISPATCH_ROWS(t, name, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, (t).scalar_type(), name, __VA_ARGS__)

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

void check_ends(const c10::optional<at::Tensor>& ends, const at::Tensor& rows, const char* op) {
  TORCH_CHECK(ends.has_value() && ends->device() == rows.device() && ends->scalar_type() == at::kInt &&
              ends->dim() == 1 && ends->size(0) > 0 && ends->is_contiguous(),
              op, ": ends must be a non-empty contiguous int32 tensor [E] on the rows' device");
}

template <typename A>
const A* opt_ptr(const c10::optional<at::Tensor>& t) { return t.has_value() ? t->data_ptr<A>() : nullptr; }

at::Tensor permute_rows(at::Tensor x, at::Tensor src) {
  check_rows(x, "permute_rows", "x");
  TORCH_CHECK(src.device() == x.device() && src.scalar_type() == at::kLong && src.dim() == 1,
              "permute_rows: src must be an int64 tensor [R] on x's device");
  const at::cuda::OptionalCUDAGuard guard(x.device());
  x = unit_cols(x);
  src = src.contiguous();
  const int64_t R = src.size(0), C = x.size(1);
  auto out = at::empty({R, C}, x.options());
  if (R == 0 || C == 0) return out;
  NETMOE_DISPATCH_ROWS(x, "permute_rows", [&] {
    with_pack<scalar_t>(packs_fit(C, sizeof(scalar_t), {{x.data_ptr(), ld_of(x)}, {out.data_ptr(), C}}), [&](auto v) {
      permute_rows_kernel<scalar_t, decltype(v)::value><<<row_blocks(R), 32 * kRowWarps, 0, stream()>>>(
          x.data_ptr<scalar_t>(), ld_of(x), x.size(0), src.data_ptr<int64_t>(), R, C, out.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

// The checks combine and its backward share: index [Q, k] int64, weight [Q, k], base_scale [Q]
// (the accumulation type), bias [E, C] with ends, perm [Q / seq] int64.
void check_combine(const char* op, const at::Tensor& rows, const at::Tensor& index,
                   const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
                   const c10::optional<at::Tensor>& ends, const c10::optional<at::Tensor>& base_scale,
                   const c10::optional<at::Tensor>& perm, int64_t seq) {
  check_rows(rows, op, "rows");
  TORCH_CHECK(index.device() == rows.device() && index.scalar_type() == at::kLong && index.dim() == 2 &&
              index.is_contiguous(), op, ": index must be a contiguous int64 tensor [Q, k] on the rows' device");
  const auto acc = acc_type(rows.scalar_type());
  TORCH_CHECK(!weight || (weight->device() == rows.device() && weight->scalar_type() == acc &&
                          weight->sizes() == index.sizes() && weight->is_contiguous()),
              op, ": weight must be contiguous, index's shape, float32 (float64 for float64 rows)");
  TORCH_CHECK(!base_scale || (base_scale->device() == rows.device() && base_scale->scalar_type() == acc &&
                              base_scale->dim() == 1 && base_scale->size(0) == index.size(0) &&
                              base_scale->is_contiguous()),
              op, ": base_scale must be contiguous [Q], float32 (float64 for float64 rows)");
  if (bias) {
    check_ends(ends, rows, op);
    TORCH_CHECK(bias->device() == rows.device() && bias->scalar_type() == rows.scalar_type() && bias->dim() == 2 &&
                bias->size(0) == ends->size(0) && bias->size(1) == rows.size(1) && bias->is_contiguous(),
                op, ": bias must be contiguous [E, C] in the rows' dtype");
    TORCH_CHECK(index.size(1) <= 32, op, ": bias takes at most 32 rows an output");
  }
  TORCH_CHECK(seq >= 1 && index.size(0) % seq == 0, op, ": seq must divide the number of output rows");
  TORCH_CHECK(!perm || (perm->device() == rows.device() && perm->scalar_type() == at::kLong && perm->dim() == 1 &&
                        perm->size(0) * seq == index.size(0) && perm->is_contiguous()),
              op, ": perm must be a contiguous int64 tensor [Q / seq]");
  TORCH_CHECK(index.size(1) < INT_MAX && (!ends || ends->size(0) < INT_MAX), op, ": too many rows an output");
}

at::Tensor combine(at::Tensor rows, at::Tensor index, c10::optional<at::Tensor> weight, c10::optional<at::Tensor> bias,
                   c10::optional<at::Tensor> ends, c10::optional<at::Tensor> base,
                   c10::optional<at::Tensor> base_scale, c10::optional<at::Tensor> perm, int64_t seq) {
  check_combine("combine", rows, index, weight, bias, ends, base_scale, perm, seq);
  const at::cuda::OptionalCUDAGuard guard(rows.device());
  rows = unit_cols(rows);
  const int64_t Q = index.size(0), C = rows.size(1);
  if (base) {
    TORCH_CHECK(base->device() == rows.device() && base->scalar_type() == rows.scalar_type() && base->dim() == 2 &&
                base->size(0) == Q && base->size(1) == C, "combine: base must be [Q, C] in the rows' dtype");
    base = unit_cols(*base);
  }
  auto out = at::empty({Q, C}, rows.options());
  if (Q == 0 || C == 0) return out;
  const int E = ends ? (int)ends->size(0) : 0;
  NETMOE_DISPATCH_ROWS(rows, "combine", [&] {
    using A = typename AccOf<scalar_t>::type;
    const scalar_t* base_ptr = base ? base->data_ptr<scalar_t>() : nullptr;
    const int64_t ld_base = base ? ld_of(*base) : C;
    const bool fit = packs_fit(C, sizeof(scalar_t), {{rows.data_ptr(), ld_of(rows)}, {base_ptr, ld_base},
                                                     {opt_ptr<scalar_t>(bias), C}, {out.data_ptr(), C}});
    with_pack<scalar_t>(fit, [&](auto v) {
      combine_kernel<scalar_t, decltype(v)::value><<<row_blocks(Q), 32 * kRowWarps, 0, stream()>>>(
          rows.data_ptr<scalar_t>(), ld_of(rows), rows.size(0), index.data_ptr<int64_t>(), (int)index.size(1),
          opt_ptr<A>(weight), opt_ptr<scalar_t>(bias), opt_ptr<int>(ends), E, base_ptr, ld_base, opt_ptr<A>(base_scale),
          opt_ptr<int64_t>(perm), seq, Q, C, out.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

// covered: every row of rows is named by exactly one index entry, so grad_rows needs no zeroing.
std::vector<at::Tensor> combine_backward(at::Tensor grad, at::Tensor rows, at::Tensor index,
                                         c10::optional<at::Tensor> weight, c10::optional<at::Tensor> bias,
                                         c10::optional<at::Tensor> ends, c10::optional<at::Tensor> base_scale,
                                         c10::optional<at::Tensor> perm, int64_t seq, bool need_base,
                                         bool need_weight, bool covered) {
  check_combine("combine_backward", rows, index, weight, bias, ends, base_scale, perm, seq);
  check_rows(grad, "combine_backward", "grad");
  TORCH_CHECK(grad.scalar_type() == rows.scalar_type() && grad.size(0) == index.size(0) && grad.size(1) == rows.size(1),
              "combine_backward: grad must be [Q, C] in the rows' dtype");
  TORCH_CHECK(!need_weight || weight, "combine_backward: need_weight without a weight");
  const at::cuda::OptionalCUDAGuard guard(rows.device());
  rows = unit_cols(rows);
  grad = unit_cols(grad);
  const int64_t Q = index.size(0), C = rows.size(1), R = rows.size(0);
  auto grad_rows = covered ? at::empty({R, C}, rows.options()) : at::zeros({R, C}, rows.options());
  auto grad_weight = need_weight ? at::empty(index.sizes(), weight->options()) : at::Tensor();
  auto grad_base = need_base ? at::empty({Q, C}, rows.options()) : at::Tensor();
  if (Q == 0) return {grad_rows, grad_weight, grad_base};
  if (C == 0) {
    if (need_weight) grad_weight.zero_();
    return {grad_rows, grad_weight, grad_base};
  }
  const int E = ends ? (int)ends->size(0) : 0;
  NETMOE_DISPATCH_ROWS(rows, "combine_backward", [&] {
    using A = typename AccOf<scalar_t>::type;
    const bool fit = packs_fit(C, sizeof(scalar_t), {{grad.data_ptr(), ld_of(grad)}, {rows.data_ptr(), ld_of(rows)},
                                                     {opt_ptr<scalar_t>(bias), C}, {grad_rows.data_ptr(), C},
                                                     {need_base ? grad_base.data_ptr() : nullptr, C}});
    with_pack<scalar_t>(fit, [&](auto v) {
      combine_backward_kernel<scalar_t, decltype(v)::value><<<row_blocks(Q), 32 * kRowWarps, 0, stream()>>>(
          grad.data_ptr<scalar_t>(), ld_of(grad), rows.data_ptr<scalar_t>(), ld_of(rows), R,
          index.data_ptr<int64_t>(), (int)index.size(1), opt_ptr<A>(weight), opt_ptr<scalar_t>(bias),
          opt_ptr<int>(ends), E, opt_ptr<A>(base_scale), opt_ptr<int64_t>(perm), seq, Q, C,
          grad_rows.data_ptr<scalar_t>(), need_weight ? grad_weight.data_ptr<A>() : nullptr,
          need_base ? grad_base.data_ptr<scalar_t>() : nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {grad_rows, grad_weight, grad_base};
}

void check_segments(const char* op, const at::Tensor& x, const c10::optional<at::Tensor>& ends) {
  check_rows(x, op, "rows");
  check_ends(ends, x, op);
  TORCH_CHECK(x.size(0) < INT_MAX, op, ": more than 2^31 - 1 rows");
}

at::Tensor bias_gelu(at::Tensor pre, at::Tensor bias, at::Tensor ends) {
  check_segments("bias_gelu", pre, ends);
  TORCH_CHECK(bias.device() == pre.device() && bias.scalar_type() == pre.scalar_type() && bias.dim() == 2 &&
              bias.size(0) == ends.size(0) && bias.size(1) == pre.size(1),
              "bias_gelu: bias must be [E, F] in pre's dtype");
  const at::cuda::OptionalCUDAGuard guard(pre.device());
  pre = unit_cols(pre);
  bias = bias.contiguous();
  const int64_t R = pre.size(0), C = pre.size(1);
  auto out = at::empty({R, C}, pre.options());
  if (R == 0 || C == 0) return out;
  NETMOE_DISPATCH_ROWS(pre, "bias_gelu", [&] {
    const bool fit = packs_fit(C, sizeof(scalar_t), {{pre.data_ptr(), ld_of(pre)}, {bias.data_ptr(), C}, {out.data_ptr(), C}});
    with_pack<scalar_t>(fit, [&](auto v) {
      bias_gelu_kernel<scalar_t, decltype(v)::value><<<row_blocks(R), 32 * kRowWarps, 0, stream()>>>(
          pre.data_ptr<scalar_t>(), ld_of(pre), R, C, bias.data_ptr<scalar_t>(), ends.data_ptr<int>(),
          (int)ends.size(0), out.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

// Partial sums over chunks, then each expert's in order: [E, C] in the accumulation type. With
// pre (and bias), the rows summed are GELU's backward of x, written to grad_pre.
at::Tensor segments(const at::Tensor& x, const at::Tensor& ends, const at::Tensor* pre, const at::Tensor* bias,
                    at::Tensor* grad_pre) {
  const int64_t R = x.size(0), C = x.size(1);
  const int E = (int)ends.size(0);
  const auto acc = x.options().dtype(acc_type(x.scalar_type()));
  auto out = at::empty({E, C}, acc);
  if (C == 0) return out;
  if (R == 0) return out.zero_();
  const int64_t chunks = (R + kSegRows - 1) / kSegRows;
  auto partial = at::empty({chunks + E, C}, acc);
  NETMOE_DISPATCH_ROWS(x, "segment_sum", [&] {
    using A = typename AccOf<scalar_t>::type;
    const bool fit = packs_fit(C, sizeof(scalar_t), {{x.data_ptr(), ld_of(x)}, {pre ? pre->data_ptr() : nullptr, C},
                                                     {bias ? bias->data_ptr() : nullptr, C},
                                                     {grad_pre ? grad_pre->data_ptr() : nullptr, C}});
    with_pack<scalar_t>(fit, [&](auto v) {
      constexpr int V = decltype(v)::value;
      const int64_t packs = (C + V - 1) / V;
      const int threads = (int)std::min<int64_t>(128, (packs + 31) / 32 * 32);
      const dim3 grid((unsigned)chunks, (unsigned)((packs + threads - 1) / threads));
      if (pre) {
        segment_partial_kernel<scalar_t, V, true><<<grid, threads, 0, stream()>>>(
            x.data_ptr<scalar_t>(), ld_of(x), pre->data_ptr<scalar_t>(), bias->data_ptr<scalar_t>(),
            ends.data_ptr<int>(), E, R, C, grad_pre->data_ptr<scalar_t>(), partial.data_ptr<A>());
      } else {
        segment_partial_kernel<scalar_t, V, false><<<grid, threads, 0, stream()>>>(
            x.data_ptr<scalar_t>(), ld_of(x), nullptr, nullptr, ends.data_ptr<int>(), E, R, C, nullptr,
            partial.data_ptr<A>());
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    segment_reduce_kernel<A><<<dim3((unsigned)((C + 255) / 256), (unsigned)E), 256, 0, stream()>>>(
        partial.data_ptr<A>(), ends.data_ptr<int>(), C, out.data_ptr<A>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor segment_sum(at::Tensor x, at::Tensor ends) {
  check_segments("segment_sum", x, ends);
  const at::cuda::OptionalCUDAGuard guard(x.device());
  x = unit_cols(x);
  return segments(x, ends, nullptr, nullptr, nullptr);
}

std::vector<at::Tensor> bias_gelu_backward(at::Tensor grad, at::Tensor pre, at::Tensor bias, at::Tensor ends) {
  check_segments("bias_gelu_backward", grad, ends);
  TORCH_CHECK(pre.sizes() == grad.sizes() && pre.scalar_type() == grad.scalar_type() && pre.device() == grad.device(),
              "bias_gelu_backward: pre must be grad's shape and dtype");
  TORCH_CHECK(bias.device() == pre.device() && bias.scalar_type() == pre.scalar_type() && bias.dim() == 2 &&
              bias.size(0) == ends.size(0) && bias.size(1) == pre.size(1),
              "bias_gelu_backward: bias must be [E, F] in pre's dtype");
  const at::cuda::OptionalCUDAGuard guard(grad.device());
  grad = unit_cols(grad);
  pre = pre.contiguous();
  bias = bias.contiguous();
  auto grad_pre = at::empty(pre.sizes(), pre.options());
  auto grad_bias = segments(grad, ends, &pre, &bias, &grad_pre);
  return {grad_pre, grad_bias};
}

// ------------------------------------------------------------------------------------------
// topk_ids: the ids of the K largest scores of each row [T, E], best first, ties to the lower id
// (torch's stable descending sort, cut at K). LANES lanes a row (8 where E <= 256 and K <= 8, else
// a warp): each lane keeps its best K of the ids lane, lane + LANES, ... in registers (an unrolled
// insertion), then K rounds of an argmax across the row's lanes pop the row's best. No shared
// memory, one pass over the scores.
// ------------------------------------------------------------------------------------------
template <typename A>
__device__ __forceinline__ bool ahead(A a, int ia, A b, int ib) { return a > b || (a == b && ia < ib); }   // NaN: never

// each step rounded on its own, as torch's separate ops round them (no fused multiply-add)
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float sub_rn(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ double sub_rn(double a, double b) { return __dsub_rn(a, b); }
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }

// affine (u != nullptr): the scores are rstd[row] (s - mean[row] u[e]) + c[e], computed here: the
// lookahead's folded LayerNorm and gate (netmoe.MoELayer._predict) without a pass of its own
template <typename T, int KMAX, int LANES>
__global__ void topk_ids_kernel(const T* __restrict__ scores, int64_t ld, int64_t rows, int E, int K,
                                const typename AccOf<T>::type* __restrict__ rstd,
                                const typename AccOf<T>::type* __restrict__ mean,
                                const typename AccOf<T>::type* __restrict__ u,
                                const typename AccOf<T>::type* __restrict__ c, int64_t* __restrict__ out) {
  const int64_t row = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) / LANES;
  const int lane = threadIdx.x % LANES;
  const bool live = row < rows;   // no early return: every lane of the warp takes part in the shuffles
  using A = typename AccOf<T>::type;   // float64 scores compare as float64
  A bv[KMAX];
  int bi[KMAX];
#pragma unroll
  for (int i = 0; i < KMAX; ++i) { bv[i] = -INFINITY; bi[i] = INT_MAX; }
  if (live) {
    const T* s = scores + row * ld;
    const A r = u ? rstd[row] : A(1), m = u ? mean[row] : A(0);
    for (int e = lane; e < E; e += LANES) {
      A v = static_cast<A>(s[e]);
      if (u) v = add_rn(mul_rn(r, sub_rn(v, mul_rn(m, u[e]))), c[e]);
      if (!ahead(v, e, bv[KMAX - 1], bi[KMAX - 1])) continue;
#pragma unroll
      for (int i = KMAX - 1; i > 0; --i) {   // shift the worse ones down, v lands in its place
        if (ahead(v, e, bv[i - 1], bi[i - 1])) { bv[i] = bv[i - 1]; bi[i] = bi[i - 1]; }
        else if (ahead(v, e, bv[i], bi[i])) { bv[i] = v; bi[i] = e; }
      }
      if (ahead(v, e, bv[0], bi[0])) { bv[0] = v; bi[0] = e; }
    }
  }
  for (int k = 0; k < K; ++k) {   // the best head of the row's lanes' lists, K times
    A v = bv[0];
    int i = bi[0];
#pragma unroll
    for (int d = LANES / 2; d; d >>= 1) {   // xor by less than LANES stays within the row's lanes
      const A ov = __shfl_xor_sync(kFull, v, d);
      const int oi = __shfl_xor_sync(kFull, i, d);
      if (ahead(ov, oi, v, i)) { v = ov; i = oi; }
    }
    if (bi[0] == i) {   // the winner pops its head (ids are distinct: one lane holds i)
#pragma unroll
      for (int j = 0; j < KMAX - 1; ++j) { bv[j] = bv[j + 1]; bi[j] = bi[j + 1]; }
      bv[KMAX - 1] = -INFINITY;
      bi[KMAX - 1] = INT_MAX;
    }
    if (live && lane == 0) out[row * K + k] = i;
  }
}

template <typename T, int KMAX, int LANES = 32>
void launch_topk(const at::Tensor& scores, int64_t rows, int E, int K, const std::vector<at::Tensor>& affine,
                 at::Tensor& out) {
  using A = typename AccOf<T>::type;
  const A* a[4] = {nullptr, nullptr, nullptr, nullptr};
  for (size_t i = 0; i < affine.size(); ++i) a[i] = affine[i].data_ptr<A>();
  const int64_t per_block = 32 * kRowWarps / LANES;
  topk_ids_kernel<T, KMAX, LANES><<<(rows + per_block - 1) / per_block, 32 * kRowWarps, 0, stream()>>>(
      scores.data_ptr<T>(), ld_of(scores), rows, E, K, a[0], a[1], a[2], a[3], out.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor topk_ids(at::Tensor scores, int64_t k, c10::optional<std::vector<at::Tensor>> affine) {
  TORCH_CHECK(scores.is_cuda() && scores.is_floating_point() && scores.dim() >= 1,
              "topk_ids: scores must be a floating-point CUDA tensor [..., E]");
  const int64_t E = scores.size(-1);
  TORCH_CHECK(k >= 1 && k <= E, "topk_ids: k must lie in [1, E]");
  const at::cuda::OptionalCUDAGuard guard(scores.device());
  auto sizes = scores.sizes().vec();
  sizes.back() = k;
  const auto acc = scores.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  std::vector<at::Tensor> aff;
  if (affine) {   // rstd, mean [rows] per row; u, c [E]: contiguous, in the accumulation type
    TORCH_CHECK(affine->size() == 4, "topk_ids: affine is (rstd, mean, u, c)");
    const int64_t rows = scores.numel() / std::max<int64_t>(E, 1);
    for (size_t i = 0; i < 4; ++i) {
      const auto& t = (*affine)[i];
      TORCH_CHECK(t.is_cuda() && t.numel() == (i < 2 ? rows : E),
                  "topk_ids: affine's rstd and mean need a value a row, u and c one a score");
      aff.push_back(t.to(acc).contiguous());
    }
  }
  if (k > 32 || E >= INT_MAX) {   // beyond the registers' lists: torch's stable sort, cut at k
    auto s = scores;
    if (affine) {
      auto shape = scores.sizes().vec();
      shape.back() = 1;
      s = aff[0].view(shape) * (scores.to(acc) - aff[1].view(shape) * aff[2]) + aff[3];
    }
    return std::get<1>(at::sort(s, /*stable=*/true, /*dim=*/-1, /*descending=*/true)).narrow(-1, 0, k).contiguous();
  }
  auto flat = unit_cols(scores.reshape({-1, E}));
  const int64_t rows = flat.size(0);
  auto out = at::empty({rows, k}, scores.options().dtype(at::kLong));
  if (rows > 0) {
    NETMOE_DISPATCH_ROWS(flat, "topk_ids", [&] {
      const int K = (int)k;
      // up to 256 scores a row: 8 lanes a row, each with a longer list to scan but a third of
      // the warp's instructions a row (the K rounds of argmax across lanes dominate a 32-lane row)
      if (E <= 256 && K <= 2) launch_topk<scalar_t, 2, 8>(flat, rows, (int)E, K, aff, out);
      else if (E <= 256 && K <= 4) launch_topk<scalar_t, 4, 8>(flat, rows, (int)E, K, aff, out);
      else if (E <= 256 && K <= 8) launch_topk<scalar_t, 8, 8>(flat, rows, (int)E, K, aff, out);
      else if (K <= 2) launch_topk<scalar_t, 2>(flat, rows, (int)E, K, aff, out);
      else if (K <= 4) launch_topk<scalar_t, 4>(flat, rows, (int)E, K, aff, out);
      else if (K <= 8) launch_topk<scalar_t, 8>(flat, rows, (int)E, K, aff, out);
      else if (K <= 16) launch_topk<scalar_t, 16>(flat, rows, (int)E, K, aff, out);
      else launch_topk<scalar_t, 32>(flat, rows, (int)E, K, aff, out);
    });
  }
  return out.view(sizes);
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
  m.def("permute_rows", &permute_rows, "x[src]: rows [T, C] copied to [R, C]", py::arg("x"), py::arg("src"));
  m.def("combine", &combine, "netmoe.combine: each output row's rows, weighted, with bias and base",
        py::arg("rows"), py::arg("index"), py::arg("weight") = py::none(), py::arg("bias") = py::none(),
        py::arg("ends") = py::none(), py::arg("base") = py::none(), py::arg("base_scale") = py::none(),
        py::arg("perm") = py::none(), py::arg("seq") = 1);
  m.def("combine_backward", &combine_backward, "netmoe.combine_backward: grad_rows, grad_weight, grad_base",
        py::arg("grad"), py::arg("rows"), py::arg("index"), py::arg("weight"), py::arg("bias"), py::arg("ends"),
        py::arg("base_scale"), py::arg("perm"), py::arg("seq"), py::arg("need_base"), py::arg("need_weight"),
        py::arg("covered"));
  m.def("bias_gelu", &bias_gelu, "GELU(pre + bias[expert of row])", py::arg("pre"), py::arg("bias"), py::arg("ends"));
  m.def("bias_gelu_backward", &bias_gelu_backward, "grad_pre, grad_bias of bias_gelu",
        py::arg("grad"), py::arg("pre"), py::arg("bias"), py::arg("ends"));
  m.def("segment_sum", &segment_sum, "[E, C]: the sum of each expert's rows", py::arg("x"), py::arg("ends"));
  m.def("topk_ids", &topk_ids, "ids of each row's k largest scores, best first, ties to the lower id; of "
        "rstd (scores - mean u) + c with affine = (rstd, mean, u, c)",
        py::arg("scores"), py::arg("k"), py::arg("affine") = py::none());
}
