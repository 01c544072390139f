/*
 * codec.h - the stream formats' pure codecs: byte order, headers, record
 * names and the format enum, written once for every reader and writer.
 *
 * Everything here is a pure function of its arguments: no context struct,
 * no I/O, no logging, no allocation.  The verifier (scan.c), the restore
 * engine (engine_restore.c), the save engine (engine_save.c), the legacy
 * converter (legacy.c), the helper's argv and the extension all go through
 * these, so a header field or a format name cannot mean two things.
 *
 * Header parsers take the header's bytes (the caller read exactly the
 * header's size) and a small plain struct, decode every field into it
 * (also on failure: a report may show what was there), and return NULL
 * when the header is valid or the reason it is not: a one-line text
 * written into why (whylen bytes; XCS_WHY_LEN is always enough), the same
 * text whoever asks.  Checks that are one reader's policy (the restore
 * engine restores HVM only, the converter wants a legacy stream inside its
 * xl header, size caps) stay with that reader.  Builders write exactly the
 * header's size.
 */
#ifndef XCS_CODEC_H
#define XCS_CODEC_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "xcs_format.h"

#ifdef __cplusplus
extern "C" {
#endif

/*----- byte order (the headers are big-endian, everything else little) -----*/

/* The x86 streams are little-endian and so is every host we build for. */
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "xcsave's stream code assumes a little-endian host"
#endif

static inline void xcs_put_be64(uint8_t *p, uint64_t v)
{
    for (int i = 7; i >= 0; i--) {
        p[i] = (uint8_t)v;
        v >>= 8;
    }
}

static inline uint64_t xcs_get_be64(const uint8_t *p)
{
    uint64_t v = 0;
    for (int i = 0; i < 8; i++)
        v = (v << 8) | p[i];
    return v;
}

static inline void xcs_put_be32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)(v >> 24);
    p[1] = (uint8_t)(v >> 16);
    p[2] = (uint8_t)(v >> 8);
    p[3] = (uint8_t)v;
}

static inline uint32_t xcs_get_be32(const uint8_t *p)
{
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) |
           ((uint32_t)p[2] << 8) | p[3];
}

static inline void xcs_put_be16(uint8_t *p, uint16_t v)
{
    p[0] = (uint8_t)(v >> 8);
    p[1] = (uint8_t)v;
}

static inline uint16_t xcs_get_be16(const uint8_t *p)
{
    return (uint16_t)(((unsigned)p[0] << 8) | p[1]);
}

/* Little-endian: a memcpy, which the compiler turns into one load/store. */
static inline uint16_t xcs_get_le16(const uint8_t *p)
{
    uint16_t v;
    memcpy(&v, p, sizeof(v));
    return v;
}

static inline uint32_t xcs_get_le32(const uint8_t *p)
{
    uint32_t v;
    memcpy(&v, p, sizeof(v));
    return v;
}

static inline uint64_t xcs_get_le64(const uint8_t *p)
{
    uint64_t v;
    memcpy(&v, p, sizeof(v));
    return v;
}

static inline void xcs_put_le16(uint8_t *p, uint16_t v)
{
    memcpy(p, &v, sizeof(v));
}

static inline void xcs_put_le32(uint8_t *p, uint32_t v)
{
    memcpy(p, &v, sizeof(v));
}

static inline void xcs_put_le64(uint8_t *p, uint64_t v)
{
    memcpy(p, &v, sizeof(v));
}

/*----- formats and stream types: one enum, one name table each -----*/

/*
 * A stream's outermost layer.  The numbers are the verifier's report
 * values; the order of xcs_fmt_names is the enum's (exported to Python as
 * _ext.FORMATS).  XCS_FMT_AUTO means "find out" (xcs_fmt_sniff).
 */
enum xcs_fmt {
    XCS_FMT_AUTO = 0,
    XCS_FMT_XL = 1,     /* xl savefile header + libxl stream (or legacy) */
    XCS_FMT_LIBXL = 2,  /* libxl stream around a libxc image */
    XCS_FMT_LIBXC = 3,  /* bare libxc image (v2/v3) */
    XCS_FMT_LEGACY = 4, /* pre-4.6 libxc image */
    XCS_FMT_COUNT = 5
};

extern const char *const xcs_fmt_names[XCS_FMT_COUNT];

/* "auto", "xl", "libxl", "libxc", "legacy"; "auto" for anything else. */
const char *xcs_fmt_name(enum xcs_fmt fmt);
/* 0 and *fmt for a name of xcs_fmt_names, -1 otherwise (NULL included). */
int xcs_fmt_parse(const char *name, enum xcs_fmt *fmt);
/* Whether the stream has a libxl layer (xl and libxl). */
static inline int xcs_fmt_has_libxl(enum xcs_fmt fmt)
{
    return fmt == XCS_FMT_XL || fmt == XCS_FMT_LIBXL;
}

/*
 * The format a stream's first n bytes announce: XCS_FMT_XL / LIBXL / LIBXC
 * by their magic, XCS_FMT_LEGACY for 8 or more bytes without one (the
 * legacy format has none), XCS_FMT_AUTO when fewer than 8 bytes were given
 * (too short to tell).  more: the stream goes on past p[n - 1] (a peek at
 * its head), so 8 or more bytes of the xl magic are the xl format; without
 * it a stream shorter than the magic is no xl savefile.  Reads at most
 * XCS_FMT_SNIFF_LEN bytes.
 */
enum xcs_fmt xcs_fmt_sniff(const uint8_t *p, size_t n, int more);
#define XCS_FMT_SNIFF_LEN XCS_XL_MAGIC_LEN /* enough to decide */

#define XCS_STREAM_TYPE_COUNT 3
extern const char *const xcs_stream_type_names[XCS_STREAM_TYPE_COUNT];

/* "plain", "remus", "colo"; "plain" for anything else. */
const char *xcs_stream_type_name(enum xcs_stream_type t);
/* 0 and *t for a name of xcs_stream_type_names, -1 otherwise. */
int xcs_stream_type_parse(const char *name, enum xcs_stream_type *t);

/*----- headers -----*/

#define XCS_WHY_LEN 160

/* xl savefile header: magic, then four host-order (little-endian) words. */
struct xcs_xl_hdr {
    uint32_t byteorder; /* XCS_XL_BYTEORDER */
    uint32_t mflags;    /* XCS_XL_MFLAG_* (mandatory) */
    uint32_t oflags;    /* optional flags (ignored) */
    uint32_t optlen;    /* optional data after the header */
};

/* XCS_XL_HDR_SIZE bytes: magic, byte order, known mandatory flags. */
const char *xcs_xl_hdr_parse(const uint8_t *p, struct xcs_xl_hdr *h,
                             char *why, size_t whylen);
/* The optional data starts with the config's length, which must fit in it. */
const char *xcs_xl_config_check(const struct xcs_xl_hdr *h, uint32_t config_len,
                                char *why, size_t whylen);
/* Writes the magic and h's words (byteorder as given: normally XCS_XL_BYTEORDER). */
void xcs_xl_hdr_build(uint8_t *p, const struct xcs_xl_hdr *h);

/* libxl stream header (big-endian). */
struct xcs_libxl_hdr {
    uint64_t ident;   /* XCS_LIBXL_IDENT */
    uint32_t version; /* XCS_LIBXL_VERSION */
    uint32_t options; /* XCS_LIBXL_OPT_* */
};

const char *xcs_libxl_hdr_parse(const uint8_t *p, struct xcs_libxl_hdr *h,
                                char *why, size_t whylen);
void xcs_libxl_hdr_build(uint8_t *p, uint32_t options);

/* libxc image header (big-endian). */
struct xcs_ihdr {
    uint64_t marker;  /* XCS_IHDR_MARKER */
    uint32_t id;      /* XCS_IHDR_ID */
    uint32_t version; /* 2 or 3 */
    uint16_t options; /* XCS_IHDR_OPT_* */
    uint16_t res1;
    uint32_t res2;
};

const char *xcs_ihdr_parse(const uint8_t *p, struct xcs_ihdr *h, char *why,
                           size_t whylen);
/* Version 3, little-endian, reserved fields zero. */
void xcs_ihdr_build(uint8_t *p);

/* libxc domain header (little-endian). */
struct xcs_dhdr {
    uint32_t type;       /* XCS_DHDR_TYPE_* */
    uint16_t page_shift; /* XCS_PAGE_SHIFT */
    uint16_t res;
    uint32_t xen_major;  /* 0: converted from a legacy stream */
    uint32_t xen_minor;
};

const char *xcs_dhdr_parse(const uint8_t *p, struct xcs_dhdr *h, char *why,
                           size_t whylen);
void xcs_dhdr_build(uint8_t *p, uint32_t type, uint32_t xen_major,
                    uint32_t xen_minor);

/*
 * Record header, the same 8 bytes in the libxc and the libxl layer (u32
 * type, u32 length, little-endian); the body is padded with zeros to
 * XCS_REC_ALIGN (xcs_rec_padded).  Length caps are the layers' rules.
 */
struct xcs_rhdr {
    uint32_t type;
    uint32_t length;
};

static inline void xcs_rhdr_get(const uint8_t *p, struct xcs_rhdr *h)
{
    h->type = xcs_get_le32(p);
    h->length = xcs_get_le32(p + 4);
}

static inline void xcs_rhdr_put(uint8_t *p, uint32_t type, uint32_t length)
{
    xcs_put_le32(p, type);
    xcs_put_le32(p + 4, length);
}

static inline uint32_t xcs_rec_padded(uint32_t length)
{
    return (length + (XCS_REC_ALIGN - 1)) & ~(uint32_t)(XCS_REC_ALIGN - 1);
}

/* Whether n bytes (padding, reserved bytes) are all zero. */
static inline int xcs_zeros(const uint8_t *p, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (p[i])
            return 0;
    return 1;
}

/*
 * PAGE_DATA: a batch header (u32 count, u32 reserved) then count pfn
 * words: type in bits 63-60 (XEN_DOMCTL_PFINFO_* >> 28), reserved bits
 * 59-52, pfn 51-0.  Types 0xd-0xf (BROKEN, XALLOC, XTAB) carry no data;
 * 5-8 are not types.
 */
static inline unsigned int xcs_pfn_type(uint64_t w)
{
    return (unsigned int)(w >> 60);
}

static inline uint64_t xcs_pfn_of(uint64_t w)
{
    return w & XCS_PAGE_DATA_PFN_MASK;
}

static inline int xcs_pfn_type_valid(unsigned int type)
{
    return type < 5 || type > 8;
}

static inline int xcs_pfn_type_has_data(unsigned int type)
{
    return type < 0xd;
}

#define XCS_PAGE_DATA_HDR_SIZE (XCS_RHDR_SIZE + 8) /* rhdr + {count, res} */

/* The record header and batch header of count pfns, ndata of them with data. */
static inline void xcs_page_data_hdr_put(uint8_t *p, uint32_t count, uint32_t ndata)
{
    xcs_rhdr_put(p, XCS_REC_PAGE_DATA, 8 + 8 * count + XCS_PAGE_SIZE * ndata);
    xcs_put_le32(p + XCS_RHDR_SIZE, count);
    xcs_put_le32(p + XCS_RHDR_SIZE + 4, 0);
}

/*----- names (reports and error lines) -----*/

/* "PAGE_DATA"; "optional record" / "unknown record" past the table. */
const char *xcs_libxc_rec_name(uint32_t type);
/* "EMULATOR_CONTEXT"; "unknown record" past the table. */
const char *xcs_libxl_rec_name(uint32_t type);
/* "LAST_CHECKPOINT"; "page batch" for ids > 0; "unknown chunk" past the table. */
const char *xcs_legacy_chunk_name(int id);
#define XCS_LEGACY_NR_CHUNKS 21 /* ids 0 .. -20 */
/* "ENOENT" for ENOENT; "errno N" (in buf) for numbers without a name. */
const char *xcs_errno_name(int err, char *buf, size_t len);

#ifdef __cplusplus
}
#endif

#endif /* XCS_CODEC_H */
