// CRC-32 as zip files use it (ISO-HDLC: the reflected polynomial 0xEDB88320, initial and final XOR 0xFFFFFFFF),
// for checking every artifact member, the manifest included, against its zip headers.
#ifndef EDGEQ_CRC32_H_
#define EDGEQ_CRC32_H_

#include <cstddef>
#include <cstdint>

namespace edgeq {

// The CRC-32 of `size` bytes at `data`.
uint32_t Crc32(const uint8_t* data, size_t size);

}  // namespace edgeq

#endif  // EDGEQ_CRC32_H_
