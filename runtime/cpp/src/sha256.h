// SHA-256 (FIPS 180-4), for checking artifact members against the manifest.
#ifndef EDGEQ_SHA256_H_
#define EDGEQ_SHA256_H_

#include <cstddef>
#include <cstdint>
#include <string>

namespace edgeq {

// Lowercase hexadecimal SHA-256 digest of `size` bytes at `data`.
std::string Sha256Hex(const uint8_t* data, size_t size);

}  // namespace edgeq

#endif  // EDGEQ_SHA256_H_
