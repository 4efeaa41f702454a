// Argument checks shared by the torch.ops.forkdec CPU op files: everything a
// kernel relies on to stay in bounds (page ids, indptr monotonicity, lengths),
// so a direct torch.ops call can never read or write outside its tensors.
// Header-only (inline) so the op files need no extra translation unit.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cstdint>
#include <limits>
#include <optional>
#include <string>

#include "cpu/attention.h"

namespace forkdec::cpu::checks {

inline Threads torch_threads() {
  Threads threads;
  threads.count = at::in_parallel_region() ? 1 : at::get_num_threads();
  threads.run = [](int64_t workers, const std::function<void(int64_t)>& body) {
    at::parallel_for(0, workers, 1, [&](int64_t begin, int64_t end) {
      for (int64_t w = begin; w < end; ++w) body(w);
    });
  };
  return threads;
}

inline bool is_float_type(at::ScalarType t) { return t == at::kFloat || t == at::kHalf || t == at::kBFloat16; }

inline DType dtype_of(at::ScalarType t) {
  return t == at::kHalf ? DType::f16 : t == at::kBFloat16 ? DType::bf16 : DType::f32;
}

inline void check_cpu(const at::Tensor& t, const char* op, const std::string& name) {
  TORCH_CHECK(t.defined(), "forkdec::", op, ": ", name, " is undefined");
  TORCH_CHECK(t.device().is_cpu(), "forkdec::", op, " (CPU): ", name, " must be a CPU tensor, got ", t.device());
}

// The last dimension contiguous (a copy only when it is not).
inline at::Tensor unit_last_stride(const at::Tensor& t) {
  return t.size(-1) > 1 && t.stride(-1) != 1 ? t.contiguous() : t;
}

// A 1-D int32/int64 tensor as contiguous int32 (int64 values must fit).
inline at::Tensor int32_vector(const at::Tensor& t, const char* op, const std::string& name) {
  check_cpu(t, op, name);
  TORCH_CHECK(t.dim() == 1, "forkdec::", op, ": ", name, " must be 1-D, got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kInt || t.scalar_type() == at::kLong, "forkdec::", op, ": ", name,
              " must be int32 (or int64), got ", t.scalar_type());
  if (t.scalar_type() == at::kInt) return t.contiguous();
  const at::Tensor wide = t.contiguous();
  const int64_t* p = wide.data_ptr<int64_t>();
  for (int64_t i = 0; i < wide.numel(); ++i) {
    TORCH_CHECK(p[i] >= std::numeric_limits<int32_t>::min() && p[i] <= std::numeric_limits<int32_t>::max(),
                "forkdec::", op, ": ", name, "[", i, "] = ", p[i], " does not fit in int32");
  }
  return wide.to(at::kInt);
}

// indptr: `length` entries (any if < 0), starts at 0, non-decreasing, ends at most at `end`.
inline void check_indptr(const at::Tensor& t, int64_t length, int64_t end, const char* op, const std::string& name) {
  TORCH_CHECK(t.numel() >= 1, "forkdec::", op, ": ", name, " needs at least one entry");
  TORCH_CHECK(length < 0 || t.numel() == length, "forkdec::", op, ": ", name, " must have ", length,
              " entries, got ", t.numel());
  const int32_t* p = t.data_ptr<int32_t>();
  TORCH_CHECK(p[0] == 0, "forkdec::", op, ": ", name, " must start at 0, got ", p[0]);
  for (int64_t i = 1; i < t.numel(); ++i) {
    TORCH_CHECK(p[i] >= p[i - 1], "forkdec::", op, ": ", name, " must be non-decreasing, but entry ", i, " (",
                p[i], ") < entry ", i - 1, " (", p[i - 1], ")");
  }
  TORCH_CHECK(p[t.numel() - 1] <= end, "forkdec::", op, ": ", name, " ends at ", p[t.numel() - 1], ", past the ",
              end, " entries it indexes");
}

// One level's tensors, checked and converted; `level` points into them.
struct CheckedLevel {
  at::Tensor qo_indptr, kv_indptr, kv_indices, kv_last_page_len, custom_mask;
  AttentionLevel level;
};

inline CheckedLevel check_level(const at::Tensor& qo_indptr, const at::Tensor& kv_indptr, const at::Tensor& kv_indices,
                         const at::Tensor& kv_last_page_len, bool causal, const std::optional<at::Tensor>& custom_mask,
                         int64_t total_q, int64_t num_pages, int64_t page_size, const char* op,
                         const std::string& prefix) {
  CheckedLevel c;
  c.qo_indptr = int32_vector(qo_indptr, op, prefix + "qo_indptr");
  check_indptr(c.qo_indptr, -1, total_q, op, prefix + "qo_indptr");
  const int64_t batch = c.qo_indptr.numel() - 1;
  const int32_t* qo = c.qo_indptr.data_ptr<int32_t>();
  TORCH_CHECK(qo[batch] == total_q, "forkdec::", op, ": ", prefix, "qo_indptr ends at ", qo[batch], ", q has ",
              total_q, " rows");

  c.kv_indices = int32_vector(kv_indices, op, prefix + "kv_indices");
  c.kv_indptr = int32_vector(kv_indptr, op, prefix + "kv_indptr");
  check_indptr(c.kv_indptr, batch + 1, c.kv_indices.numel(), op, prefix + "kv_indptr");
  const int32_t* indptr = c.kv_indptr.data_ptr<int32_t>();
  const int32_t* pages = c.kv_indices.data_ptr<int32_t>();
  for (int64_t i = 0; i < indptr[batch]; ++i) {
    TORCH_CHECK(pages[i] >= 0 && pages[i] < num_pages, "forkdec::", op, ": ", prefix, "kv_indices[", i, "] = ",
                pages[i], " is not a page id in [0, ", num_pages, ")");
  }

  c.kv_last_page_len = int32_vector(kv_last_page_len, op, prefix + "kv_last_page_len");
  TORCH_CHECK(c.kv_last_page_len.numel() == batch, "forkdec::", op, ": ", prefix, "kv_last_page_len must have ",
              batch, " entries, got ", c.kv_last_page_len.numel());
  const int32_t* last = c.kv_last_page_len.data_ptr<int32_t>();
  int64_t mask_entries = 0;
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t n = indptr[b + 1] - indptr[b];
    if (n > 0) {
      TORCH_CHECK(last[b] >= 1 && last[b] <= page_size, "forkdec::", op, ": ", prefix, "kv_last_page_len[", b,
                  "] = ", last[b], " must be in [1, page_size = ", page_size, "] for a request with pages");
    }
    const int64_t kv_len = n == 0 ? 0 : (n - 1) * page_size + last[b];
    mask_entries += static_cast<int64_t>(qo[b + 1] - qo[b]) * kv_len;
  }

  c.level.batch = batch;
  c.level.qo_indptr = qo;
  c.level.kv_indptr = indptr;
  c.level.kv_indices = pages;
  c.level.kv_last_page_len = last;
  c.level.causal = causal;
  if (custom_mask.has_value() && custom_mask->defined()) {
    const at::Tensor& mask = *custom_mask;
    check_cpu(mask, op, prefix + "custom_mask");
    if (mask.scalar_type() == at::kBool) {
      TORCH_CHECK(mask.numel() == mask_entries, "forkdec::", op, ": ", prefix, "custom_mask has ", mask.numel(),
                  " entries, expected sum(qo_len * kv_len) = ", mask_entries);
      c.level.mask_packed = false;
    } else {
      TORCH_CHECK(mask.scalar_type() == at::kByte, "forkdec::", op, ": ", prefix,
                  "custom_mask must be bool or bit-packed uint8, got ", mask.scalar_type());
      TORCH_CHECK(mask.numel() == (mask_entries + 7) / 8, "forkdec::", op, ": ", prefix, "custom_mask (packed) has ",
                  mask.numel(), " bytes, expected ceil(", mask_entries, " / 8) = ", (mask_entries + 7) / 8);
      c.level.mask_packed = true;
    }
    c.custom_mask = mask.contiguous();
    c.level.custom_mask = c.custom_mask.numel() > 0 ? static_cast<const uint8_t*>(c.custom_mask.data_ptr()) : nullptr;
    // An empty mask over an empty problem masks nothing; keep the flag meaningful.
    if (c.level.custom_mask == nullptr) c.level.mask_packed = false;
  }
  return c;
}

}  // namespace forkdec::cpu::checks
