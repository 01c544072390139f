/*
 * wire.h - the frames of xcsave wire 1 (docs/architecture.md, "Migration"; the pumps are wire.c).
 *
 * Every frame starts with this 32-byte little-endian header:
 *
 *   u32 magic  "XCSF"     u8 type      u8 codec     u16 channel
 *   u32 raw_len           u32 wire_len
 *   u64 seq               u64 aux
 *
 * DATA (sender -> receiver) carries wire_len payload bytes that are
 * raw_len bytes of the plain stream (codec 0: the bytes themselves; 1: one
 * zstd frame of them).  END (s->r): seq = DATA frames in all, aux = plain
 * bytes in all.  ACK and RESUME (r->s): seq = the next frame expected, ACK's
 * aux = plain bytes written.  The checks are xcs_wire_check() (also what
 * the fuzz target runs).
 */
#ifndef XCS_WIRE_H
#define XCS_WIRE_H

#include <stddef.h>
#include <stdint.h>

#define XCS_WIRE_MAGIC 0x46534358u /* 'X','C','S','F' little-endian */
#define XCS_WIRE_HDR 32u

enum xcs_wire_type { XCS_WT_DATA = 1, XCS_WT_END = 2, XCS_WT_ACK = 3, XCS_WT_RESUME = 4 };
enum xcs_wire_codec { XCS_WC_RAW = 0, XCS_WC_ZSTD = 1 };

struct xcs_wire_hdr {
    uint32_t magic;
    uint8_t type, codec;
    uint16_t channel;
    uint32_t raw_len, wire_len;
    uint64_t seq, aux;
};

void xcs_wire_hdr_put(uint8_t *p, const struct xcs_wire_hdr *h);
void xcs_wire_hdr_get(const uint8_t *p, struct xcs_wire_hdr *h);

/*
 * Whether h may arrive on channel `channel` of a pump that receives the
 * types in `accept` (a bit 1 << type each), frames of at most frame_max.
 * 0, or -1 with a one-line reason in why[0..size).  Seq bounds are the
 * pump's (they depend on its state).
 */
int xcs_wire_check(const struct xcs_wire_hdr *h, unsigned channel, unsigned accept,
                   uint32_t frame_max, int zstd_built, char *why, size_t size);

/*
 * A DATA payload back to its raw_len plain bytes in out (raw_len bytes of
 * room): 0, or -1 with the reason (the zstd frame is bad, or does not
 * expand to exactly raw_len bytes).  ctx: a ZSTD_DCtx, or NULL for one
 * made here.
 */
int xcs_wire_unpack(const struct xcs_wire_hdr *h, const uint8_t *payload, uint8_t *out,
                    void *ctx, char *why, size_t size);

/* "DATA", "END", "ACK", "RESUME" ("?" for others), for messages. */
const char *xcs_wire_type_name(unsigned type);

/* Whether zstd (wire compression) is built into this helper. */
int xcs_wire_zstd_built(void);

#endif /* XCS_WIRE_H */
