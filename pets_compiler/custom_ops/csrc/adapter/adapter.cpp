#include "adapter.h"

#include <vector>

#include "../bias/bias.h"
#include "../common/checks.h"
#include "../common/task_groups.h"
#include "../layer_norm/layer_norm.h"

namespace pets {
namespace {

constexpr const char* kOp = "pets::adapter";
constexpr const char* kColumnNames[kAdapterConfigColumns] = {
    "enabled", "original_ln_before", "residual_before_ln", "original_ln_after", "activation", "bottleneck"};
constexpr const char* kActivationCodes =
    "0 identity, 1 relu, 2 silu, 3 gelu, 4 gelu_tanh, 5 tanh, 6 sigmoid, 7 leaky_relu";

void check_adapter_tables(const at::Tensor& h, const at::Tensor& ln_weight_delta, const at::Tensor& down_w,
                          const at::Tensor& down_b, const at::Tensor& up_w, const at::Tensor& up_b,
                          const at::Tensor& scaling, const at::Tensor& config) {
  const int64_t hidden = h.size(-1);
  check_table(kOp, "down_w", down_w, 3, "h", h);
  const int64_t slots = down_w.size(0), padded = down_w.size(1);
  TORCH_CHECK(down_w.size(2) == hidden, kOp, ": down_w must be [T, R, H] with H = h.size(-1) = ", hidden,
              ", got shape ", down_w.sizes());
  check_table(kOp, "down_b", down_b, 2, "h", h);
  TORCH_CHECK(down_b.size(0) == slots && down_b.size(1) == padded, kOp, ": down_b must be [T, R] = [", slots,
              ", ", padded, "] like down_w ", down_w.sizes(), ", got shape ", down_b.sizes());
  check_table(kOp, "up_w", up_w, 3, "h", h);
  TORCH_CHECK(up_w.size(0) == slots && up_w.size(1) == hidden && up_w.size(2) == padded, kOp,
              ": up_w must be [T, H, R] = [", slots, ", ", hidden, ", ", padded, "] like down_w ", down_w.sizes(),
              ", got shape ", up_w.sizes());
  check_table(kOp, "up_b", up_b, 2, "h", h);
  TORCH_CHECK(up_b.size(0) == slots && up_b.size(1) == hidden, kOp, ": up_b must be [T, H] = [", slots, ", ",
              hidden, "], got shape ", up_b.sizes());
  check_table(kOp, "scaling", scaling, 1, "h", h);
  TORCH_CHECK(scaling.size(0) == slots, kOp, ": scaling must be [T] with T = ", slots, " (down_w ",
              down_w.sizes(), "), got shape ", scaling.sizes());
  TORCH_CHECK(config.scalar_type() == at::kLong && config.dim() == 2 && config.size(0) == slots &&
                  config.size(1) == kAdapterConfigColumns,
              kOp,
              ": config must be an int64 [T, 6] table (enabled, original_ln_before, residual_before_ln, "
              "original_ln_after, activation, bottleneck) with T = ",
              slots, ", got ", config.scalar_type(), " ", config.sizes());
  check_device(kOp, "config", config, "h", h);
  TORCH_CHECK(ln_weight_delta.size(0) == slots, kOp,
              ": the LayerNorm deltas and the adapter tables must have one slot count T, got ln_weight_delta ",
              ln_weight_delta.sizes(), ", down_w ", down_w.sizes());
}

// The config rows of the slots the batch uses: 0/1 flags, a known activation, a bottleneck in [0, R].
void check_used_configs(const at::Tensor& task_ids, const int64_t* config, int64_t slots, int64_t padded) {
  const at::Tensor ids = task_ids.contiguous();
  const int64_t* tp = ids.const_data_ptr<int64_t>();
  std::vector<char> seen(slots, 0);
  for (int64_t i = 0; i < ids.numel(); ++i) {
    const int64_t t = tp[i];
    if (seen[t]) continue;
    seen[t] = 1;
    const int64_t* c = config + t * kAdapterConfigColumns;
    for (int64_t j = kAdapterEnabled; j <= kAdapterOriginalLnAfter; ++j) {
      TORCH_CHECK(c[j] == 0 || c[j] == 1, kOp, ": config[", t, ", ", j, "] = ", c[j], " (", kColumnNames[j],
                  " of slot ", t, ") must be 0 or 1");
    }
    TORCH_CHECK(c[kAdapterActivation] >= 0 && c[kAdapterActivation] < kAdapterActivationCount, kOp, ": slot ", t,
                " has the unknown activation code ", c[kAdapterActivation], " (config[", t, ", ",
                int64_t{kAdapterActivation}, "]); the codes are ", kActivationCodes);
    TORCH_CHECK(c[kAdapterBottleneck] >= 0 && c[kAdapterBottleneck] <= padded, kOp, ": config[", t, ", ",
                int64_t{kAdapterBottleneck}, "] = ", c[kAdapterBottleneck], " (bottleneck of slot ", t,
                ") is outside [0, R] with R = ", padded, " (down_w's padded bottleneck)");
  }
}

void activate_(at::Tensor& t, int64_t code) {
  switch (code) {
    case kActIdentity:
      return;
    case kActRelu:
      at::relu_(t);
      return;
    case kActSilu:
      at::silu_(t);
      return;
    case kActGelu:
      at::gelu_(t, "none");
      return;
    case kActGeluTanh:
      at::gelu_(t, "tanh");
      return;
    case kActTanh:
      at::tanh_(t);
      return;
    case kActSigmoid:
      at::sigmoid_(t);
      return;
    case kActLeakyRelu:
      at::leaky_relu_(t, 0.01);
      return;
    default:
      TORCH_CHECK(false, kOp, ": unknown activation code ", code, "; the codes are ", kActivationCodes);
  }
}

}  // namespace

void check_adapter_inputs(const at::Tensor& h, const at::Tensor& residual, const at::Tensor& task_ids,
                          const at::Tensor& ln_weight, const at::Tensor& ln_bias, const at::Tensor& ln_weight_delta,
                          const at::Tensor& ln_bias_delta, const at::Tensor& down_w, const at::Tensor& down_b,
                          const at::Tensor& up_w, const at::Tensor& up_b, const at::Tensor& scaling,
                          const at::Tensor& config, const std::optional<at::Tensor>& h_bias) {
  check_batch_tensor(kOp, "h", h);
  check_like(kOp, "residual", residual, "h", h);
  check_task_ids(kOp, task_ids, "h", h);
  check_layer_norm_params(kOp, "h", h, {"ln_weight", "ln_bias", "ln_weight_delta", "ln_bias_delta"}, ln_weight,
                          ln_bias, ln_weight_delta, ln_bias_delta);
  check_adapter_tables(h, ln_weight_delta, down_w, down_b, up_w, up_b, scaling, config);
  if (h_bias.has_value()) check_feature_table(kOp, "h_bias", *h_bias, "h", h);
}

at::Tensor adapter_cpu(const at::Tensor& h, const at::Tensor& residual, const at::Tensor& task_ids,
                       const at::Tensor& ln_weight, const at::Tensor& ln_bias, const at::Tensor& ln_weight_delta,
                       const at::Tensor& ln_bias_delta, double eps, const at::Tensor& down_w,
                       const at::Tensor& down_b, const at::Tensor& up_w, const at::Tensor& up_b,
                       const at::Tensor& scaling, const at::Tensor& config, const std::optional<at::Tensor>& h_bias) {
  check_adapter_inputs(h, residual, task_ids, ln_weight, ln_bias, ln_weight_delta, ln_bias_delta, down_w, down_b,
                       up_w, up_b, scaling, config, h_bias);
  check_task_id_range(kOp, task_ids, config.size(0), "config");
  if (h_bias.has_value()) check_task_id_range(kOp, task_ids, h_bias->size(0), "h_bias");
  const at::Tensor config_host = config.contiguous();
  const int64_t* cfg = config_host.const_data_ptr<int64_t>();
  const int64_t padded = down_w.size(1);
  check_used_configs(task_ids, cfg, config.size(0), padded);

  at::Tensor h3 = as_rows(h).contiguous();
  if (h_bias.has_value()) {  // h + h_bias[t] as pets::bias_delta computes it, read below wherever h is
    at::Tensor biased = at::empty_like(h3);
    add_bias_cpu(biased, h3, task_ids, *h_bias);
    h3 = biased;
  }
  const at::Tensor res3 = as_rows(residual).contiguous();
  const int64_t tokens = h3.size(1), hidden = h3.size(2);
  // LN_t(h + residual) for every row, by pets::layer_norm's own code on the same sum: the rows of slots without
  // an adapter are bitwise pets::layer_norm(h + residual); the rows of the others are overwritten below.
  at::Tensor out = layer_norm_unchecked_cpu(at::add(h3, res3), task_ids, ln_weight, ln_bias, ln_weight_delta,
                                            ln_bias_delta, eps);
  const at::Tensor scaling_host = scaling.to(at::kDouble).contiguous();
  const double* scales = scaling_host.const_data_ptr<double>();

  const TaskGroups groups = group_rows_by_task(task_ids);
  for (const TaskSegment& seg : groups.segments) {
    const int64_t* c = cfg + seg.slot * kAdapterConfigColumns;
    if (!c[kAdapterEnabled]) continue;
    const int64_t rows = seg.count * tokens;
    // The segment's rows of a [B, N, H] tensor as a fresh [rows, H] buffer, and the slot's weights narrowed to
    // its own bottleneck r as fresh contiguous tensors: the matmuls then see the same operands (values, shapes,
    // strides and alignment) whatever else shares the batch and whatever the padded R, so a row's result is
    // bitwise independent of the other slots.
    const auto segment_rows = [&](const at::Tensor& t3) {
      const at::Tensor rows3 =
          groups.sorted() ? t3.narrow(0, seg.begin, seg.count).clone() : t3.index_select(0, groups.rows(seg));
      return rows3.view({rows, hidden});
    };
    const int64_t r = c[kAdapterBottleneck];
    const at::Tensor dw = down_w.select(0, seg.slot).narrow(0, 0, r).clone(at::MemoryFormat::Contiguous);
    const at::Tensor db = down_b.select(0, seg.slot).narrow(0, 0, r).clone(at::MemoryFormat::Contiguous);
    const at::Tensor uw = up_w.select(0, seg.slot).narrow(1, 0, r).clone(at::MemoryFormat::Contiguous);
    const at::Tensor ub = up_b.select(0, seg.slot).clone(at::MemoryFormat::Contiguous);

    const bool ln_before = c[kAdapterOriginalLnBefore] != 0;
    const at::Tensor a_in = segment_rows(ln_before ? out : h3);  // out still holds LN_t(h + residual) here
    const at::Tensor res = (ln_before && c[kAdapterResidualBeforeLn]) ? segment_rows(h3) : a_in;
    at::Tensor down = at::addmm(db, a_in, dw.t());  // [rows, r]
    activate_(down, c[kAdapterActivation]);
    const at::Tensor up = at::addmm(ub, down, uw.t());  // [rows, H]
    const at::Tensor z = at::add(res, up, scales[seg.slot]);
    at::Tensor seg_out;
    if (c[kAdapterOriginalLnAfter]) {
      const at::Tensor pre = at::add(z, segment_rows(res3)).view({seg.count, tokens, hidden});
      const at::Tensor slot_ids = at::full({seg.count}, seg.slot, task_ids.options());
      seg_out = layer_norm_unchecked_cpu(pre, slot_ids, ln_weight, ln_bias, ln_weight_delta, ln_bias_delta, eps);
    } else {
      seg_out = z.view({seg.count, tokens, hidden});
    }
    if (groups.sorted()) {
      out.narrow(0, seg.begin, seg.count).copy_(seg_out);
    } else {
      out.index_copy_(0, groups.rows(seg), seg_out);
    }
  }
  return out.view(h.sizes());
}

}  // namespace pets
