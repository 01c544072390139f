/*
 * wire_frame.c - the frames of xcsave wire 1 (wire.h): header encoding, the
 * checks a received header must pass, and a DATA payload back to plain
 * bytes.  No I/O and no helper state: the pumps (wire.c) and the fuzz
 * target (fuzz/fuzz_wire.c) share it.
 */

#include <stdio.h>
#include <string.h>

#include "codec.h"
#include "wire.h"

#ifdef XCS_HAVE_ZSTD
#include <zstd.h>
#endif

void xcs_wire_hdr_put(uint8_t *p, const struct xcs_wire_hdr *h)
{
    xcs_put_le32(p, h->magic);
    p[4] = h->type;
    p[5] = h->codec;
    xcs_put_le16(p + 6, h->channel);
    xcs_put_le32(p + 8, h->raw_len);
    xcs_put_le32(p + 12, h->wire_len);
    xcs_put_le64(p + 16, h->seq);
    xcs_put_le64(p + 24, h->aux);
}

void xcs_wire_hdr_get(const uint8_t *p, struct xcs_wire_hdr *h)
{
    h->magic = xcs_get_le32(p);
    h->type = p[4];
    h->codec = p[5];
    h->channel = xcs_get_le16(p + 6);
    h->raw_len = xcs_get_le32(p + 8);
    h->wire_len = xcs_get_le32(p + 12);
    h->seq = xcs_get_le64(p + 16);
    h->aux = xcs_get_le64(p + 24);
}

const char *xcs_wire_type_name(unsigned type)
{
    static const char *const names[] = {"?", "DATA", "END", "ACK", "RESUME"};

    return type < sizeof(names) / sizeof(names[0]) ? names[type] : "?";
}

int xcs_wire_check(const struct xcs_wire_hdr *h, unsigned channel, unsigned accept,
                   uint32_t frame_max, int zstd_built, char *why, size_t size)
{
    if (h->magic != XCS_WIRE_MAGIC) {
        snprintf(why, size, "bad frame magic 0x%08x (not an xcsave wire frame)", h->magic);
        return -1;
    }
    if (h->type < XCS_WT_DATA || h->type > XCS_WT_RESUME || !(accept & (1u << h->type))) {
        snprintf(why, size, "unexpected frame type %u", h->type);
        return -1;
    }
    if (h->channel != channel) {
        snprintf(why, size, "%s frame names channel %u", xcs_wire_type_name(h->type), h->channel);
        return -1;
    }
    if (h->type != XCS_WT_DATA) {
        if (h->codec || h->raw_len || h->wire_len || (h->type != XCS_WT_END &&
                                                      h->type != XCS_WT_ACK && h->aux)) {
            snprintf(why, size, "%s frame with codec/lengths/aux set", xcs_wire_type_name(h->type));
            return -1;
        }
        return 0;
    }
    if (h->raw_len == 0 || h->raw_len > frame_max) {
        snprintf(why, size, "DATA frame of %u plain bytes (1 to %u allowed)", h->raw_len,
                 frame_max);
        return -1;
    }
    if (h->aux) {
        snprintf(why, size, "DATA frame with aux set");
        return -1;
    }
    if (h->codec == XCS_WC_RAW && h->wire_len != h->raw_len) {
        snprintf(why, size, "raw DATA frame of %u bytes says %u plain bytes", h->wire_len,
                 h->raw_len);
        return -1;
    }
    if (h->codec == XCS_WC_ZSTD && (h->wire_len == 0 || h->wire_len >= h->raw_len)) {
        snprintf(why, size, "zstd DATA frame of %u bytes for %u plain bytes", h->wire_len,
                 h->raw_len);
        return -1;
    }
    if (h->codec == XCS_WC_ZSTD && !zstd_built) {
        snprintf(why, size, "zstd DATA frame, but zstd is not built into this helper");
        return -1;
    }
    if (h->codec > XCS_WC_ZSTD) {
        snprintf(why, size, "DATA frame with unknown codec %u", h->codec);
        return -1;
    }
    return 0;
}

int xcs_wire_unpack(const struct xcs_wire_hdr *h, const uint8_t *payload, uint8_t *out,
                    void *ctx, char *why, size_t size)
{
    if (h->codec == XCS_WC_RAW) {
        memcpy(out, payload, h->raw_len);
        return 0;
    }
#ifdef XCS_HAVE_ZSTD
    {
        ZSTD_DCtx *d = ctx ? ctx : ZSTD_createDCtx();
        size_t n;
        int rc = -1;

        if (!d) {
            snprintf(why, size, "out of memory for a zstd context");
            return -1;
        }
        /* The output is bounded by raw_len: a frame that claims more is refused by zstd. */
        n = ZSTD_decompressDCtx(d, out, h->raw_len, payload, h->wire_len);
        if (ZSTD_isError(n))
            snprintf(why, size, "zstd DATA frame %llu: %s", (unsigned long long)h->seq,
                     ZSTD_getErrorName(n));
        else if (n != h->raw_len)
            snprintf(why, size, "zstd DATA frame %llu expands to %zu bytes, not %u",
                     (unsigned long long)h->seq, n, h->raw_len);
        else
            rc = 0;
        if (!ctx)
            ZSTD_freeDCtx(d);
        return rc;
    }
#else
    (void)payload;
    (void)out;
    (void)ctx;
    snprintf(why, size, "zstd DATA frame, but zstd is not built into this helper");
    return -1;
#endif
}

int xcs_wire_zstd_built(void)
{
#ifdef XCS_HAVE_ZSTD
    return 1;
#else
    return 0;
#endif
}
