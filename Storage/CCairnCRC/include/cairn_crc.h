#ifndef CAIRN_CRC_H
#define CAIRN_CRC_H
#include <stddef.h>
#include <stdint.h>

/// 1 if this CPU has the SSE4.2 CRC32 instruction, else 0.
int cairn_crc32c_hw_available(void);

/// Extends a CRC-32C (same convention as the software version: start from 0) with the
/// SSE4.2 CRC32 instruction. Call only when cairn_crc32c_hw_available() returned 1.
uint32_t cairn_crc32c_hw(uint32_t crc, const void *data, size_t length);

#endif
