/*
 * fuzz_wire.c - libFuzzer harness for the wire frame parser (csrc/wire_frame.c):
 * what wire-recv does with every frame a peer sends, header checks and the
 * payload back to plain bytes (zstd when built with XCS_HAVE_ZSTD).
 *
 * Input: one option byte (bits 0-3: frame_max = 4 KiB << (bits % 11), up to
 * the 4 MiB cap; bit 4: accept END too), then frames, each a 32-byte header
 * followed by wire_len payload bytes when the header passes the checks.
 *
 * Invariants beyond "no sanitizer report": a refused header or payload
 * names a reason (NUL-terminated); an accepted DATA header bounds every
 * allocation by frame_max (-malloc_limit_mb catches the rest); an accepted
 * payload fills exactly raw_len bytes.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "wire.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct xcs_wire_hdr h;
    uint32_t frame_max;
    unsigned accept = 1u << XCS_WT_DATA;
    char why[160];

    if (size < 1)
        return 0;
    frame_max = 4096u << ((data[0] & 15) % 11);
    if (data[0] & 16)
        accept |= 1u << XCS_WT_END;
    data++;
    size--;
    while (size >= XCS_WIRE_HDR) {
        uint8_t *out;

        xcs_wire_hdr_get(data, &h);
        data += XCS_WIRE_HDR;
        size -= XCS_WIRE_HDR;
        why[0] = '\0';
        if (xcs_wire_check(&h, 0, accept, frame_max, xcs_wire_zstd_built(), why,
                           sizeof(why)) < 0) {
            if (!why[0] || !memchr(why, '\0', sizeof(why)))
                abort();
            return 0;
        }
        if (h.type != XCS_WT_DATA)
            continue;
        if (h.raw_len > frame_max || h.wire_len > frame_max)
            abort(); /* the check must bound both */
        if (h.wire_len > size)
            return 0; /* a short input just ends */
        out = malloc(h.raw_len);
        if (!out)
            return 0;
        why[0] = '\0';
        if (xcs_wire_unpack(&h, data, out, NULL, why, sizeof(why)) < 0 && !why[0])
            abort();
        free(out);
        data += h.wire_len;
        size -= h.wire_len;
    }
    return 0;
}
