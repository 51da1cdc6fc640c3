// How the shim's entry points report an exception to their Rust caller: its text, copied into
// the caller's buffer (NUL-terminated, cut to fit); nothing throws across the C ABI.
#pragma once

#include <cstddef>
#include <cstring>
#include <exception>

inline int axial_report(const std::exception& e, char* err, size_t err_len) {
  if (err_len > 0) {
    std::strncpy(err, e.what(), err_len - 1);
    err[err_len - 1] = '\0';
  }
  return 1;
}
