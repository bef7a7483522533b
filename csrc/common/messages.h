// Contract: the text of the error clip_norm raises with error_if_nonfinite=True, shared by the
// CPU kernel (cpu/norm_ops.cpp) and the CUDA launcher (cuda/norm_ops.cpp), and by
// gradstab/reference.py (nonfinite_message) in Python: torch.nn.utils.clip_grad_norm_'s message
// word for word, the norm type printed as Python prints a float ("2.0", "inf", "0.5"), so code
// matching torch's message matches gradstab's; then what gradstab knows (the total, the first
// gradient holding a NaN/Inf). Host code, ATen only.
#pragma once

#include <ATen/ATen.h>

#include <charconv>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <sstream>
#include <string>
#include <vector>

namespace gradstab {

// repr(float(v)) of Python: the shortest digits that round-trip, in fixed notation for decimal
// exponents -4..15 (with ".0" when integral), else d.ddde+XX; "inf", "-inf", "nan".
inline std::string python_float_repr(double v) {
  if (std::isnan(v)) return "nan";
  if (std::isinf(v)) return v > 0 ? "inf" : "-inf";
  char buf[64];
  const auto res = std::to_chars(buf, buf + sizeof(buf), v, std::chars_format::scientific);
  std::string s(buf, res.ptr);  // [-]d[.ddd]e(+|-)XX, shortest round-trip digits
  std::string sign;
  if (s[0] == '-') {
    sign = "-";
    s.erase(0, 1);
  }
  const size_t e = s.find('e');
  const int exp = std::atoi(s.c_str() + e + 1);
  std::string digits;
  for (size_t i = 0; i < e; ++i) {
    if (s[i] != '.') digits += s[i];
  }
  const int n = static_cast<int>(digits.size());
  std::string out;
  if (exp >= -4 && exp < 16) {
    if (exp < 0) {
      out = "0." + std::string(static_cast<size_t>(-exp - 1), '0') + digits;
    } else if (n <= exp + 1) {
      out = digits + std::string(static_cast<size_t>(exp + 1 - n), '0') + ".0";
    } else {
      out = digits.substr(0, exp + 1) + "." + digits.substr(exp + 1);
    }
  } else {
    out = digits.substr(0, 1);
    if (n > 1) out += "." + digits.substr(1);
    char tail[16];
    std::snprintf(tail, sizeof(tail), "e%c%02d", exp < 0 ? '-' : '+', std::abs(exp));
    out += tail;
  }
  return sign + out;
}

// The error message; nonfinite[i] is gradient i's count of NaN/Inf elements.
inline std::string nonfinite_message(double p, double total, at::TensorList grads,
                                     const std::vector<int64_t>& nonfinite) {
  std::ostringstream os;
  os << "The total norm of order " << python_float_repr(p)
     << " for gradients from `parameters` is non-finite, so it cannot be clipped. To disable "
        "this error and scale the gradients by the non-finite norm anyway, set "
        "`error_if_nonfinite=False`. gradstab: the total norm is "
     << python_float_repr(total) << "; ";
  int64_t sum = 0, first = -1;
  for (size_t i = 0; i < nonfinite.size(); ++i) {
    sum += nonfinite[i];
    if (first < 0 && nonfinite[i] > 0) first = static_cast<int64_t>(i);
  }
  if (first >= 0) {
    os << sum << " non-finite value(s), the first in gradient " << first << " of "
       << nonfinite.size() << " (shape " << grads[first].sizes() << ")";
  } else {
    os << "no non-finite gradient value (the norm overflowed its result dtype)";
  }
  os << ". No gradient was changed.";
  return os.str();
}

}  // namespace gradstab
