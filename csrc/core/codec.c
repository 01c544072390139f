/*
 * codec.c - the stream formats' pure codecs (see codec.h).
 *
 * Written from shared/specs/xen-migration-facts.md sections 2 and 3.  The
 * reasons below are the texts verify and restore print (after their own
 * "where" prefix), so tests and users see one wording per fault.
 */
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>

#include "codec.h"

/*----- formats and stream types -----*/

const char *const xcs_fmt_names[XCS_FMT_COUNT] = {
    [XCS_FMT_AUTO] = "auto",   [XCS_FMT_XL] = "xl",
    [XCS_FMT_LIBXL] = "libxl", [XCS_FMT_LIBXC] = "libxc",
    [XCS_FMT_LEGACY] = "legacy",
};

/* The index of name in a name table, or -1. */
static int name_index(const char *const *names, unsigned int n, const char *name)
{
    for (unsigned int i = 0; name && i < n; i++)
        if (!strcmp(name, names[i]))
            return (int)i;
    return -1;
}

const char *xcs_fmt_name(enum xcs_fmt fmt)
{
    return xcs_fmt_names[(unsigned int)fmt < XCS_FMT_COUNT ? fmt : XCS_FMT_AUTO];
}

int xcs_fmt_parse(const char *name, enum xcs_fmt *fmt)
{
    int i = name_index(xcs_fmt_names, XCS_FMT_COUNT, name);

    if (i >= 0)
        *fmt = (enum xcs_fmt)i;
    return i < 0 ? -1 : 0;
}

enum xcs_fmt xcs_fmt_sniff(const uint8_t *p, size_t n, int more)
{
    static const uint8_t ff[8] = {0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff};

    if (n < 8)
        return XCS_FMT_AUTO;
    if ((n >= XCS_XL_MAGIC_LEN || more) &&
        !memcmp(p, XCS_XL_MAGIC, n < XCS_XL_MAGIC_LEN ? n : XCS_XL_MAGIC_LEN))
        return XCS_FMT_XL;
    if (xcs_get_be64(p) == XCS_LIBXL_IDENT)
        return XCS_FMT_LIBXL;
    if (!memcmp(p, ff, 8))
        return XCS_FMT_LIBXC; /* the image header's marker */
    return XCS_FMT_LEGACY;    /* no magic: the legacy heuristics decide */
}

const char *const xcs_stream_type_names[XCS_STREAM_TYPE_COUNT] = {
    [XCS_STREAM_PLAIN] = "plain",
    [XCS_STREAM_REMUS] = "remus",
    [XCS_STREAM_COLO] = "colo",
};

const char *xcs_stream_type_name(enum xcs_stream_type t)
{
    return xcs_stream_type_names[(unsigned int)t < XCS_STREAM_TYPE_COUNT ? t
                                                                         : XCS_STREAM_PLAIN];
}

int xcs_stream_type_parse(const char *name, enum xcs_stream_type *t)
{
    int i = name_index(xcs_stream_type_names, XCS_STREAM_TYPE_COUNT, name);

    if (i >= 0)
        *t = (enum xcs_stream_type)i;
    return i < 0 ? -1 : 0;
}

/*----- headers -----*/

__attribute__((format(printf, 3, 4)))
static const char *why_f(char *why, size_t whylen, const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(why, whylen, fmt, ap);
    va_end(ap);
    return why;
}

/*
 * The headers' wire layouts as data: each field's offset in the header,
 * width (2, 4 or 8 bytes, the same in the struct), byte order and place in
 * the struct.  One get and one put serve every header's parse and build;
 * what a header must hold stays with its own parse.
 */
struct xcs_field {
    uint8_t wire;  /* offset in the wire header */
    uint8_t width; /* 2, 4 or 8 */
    uint8_t be;    /* 1: big-endian */
    uint8_t off;   /* offsetof in the struct */
};

#define FIELD(wire_, type_, member_, be_)                                     \
    {(wire_), sizeof(((type_ *)0)->member_), (be_), offsetof(type_, member_)}
#define NFIELDS(t) (sizeof(t) / sizeof((t)[0]))

static void fields_get(const struct xcs_field *f, size_t n, const uint8_t *p,
                       void *h)
{
    for (size_t i = 0; i < n; i++) {
        const uint8_t *w = p + f[i].wire;
        uint8_t *to = (uint8_t *)h + f[i].off;

        if (f[i].width == 8) {
            uint64_t v = f[i].be ? xcs_get_be64(w) : xcs_get_le64(w);

            memcpy(to, &v, sizeof(v));
        } else if (f[i].width == 4) {
            uint32_t v = f[i].be ? xcs_get_be32(w) : xcs_get_le32(w);

            memcpy(to, &v, sizeof(v));
        } else {
            uint16_t v = f[i].be ? xcs_get_be16(w) : xcs_get_le16(w);

            memcpy(to, &v, sizeof(v));
        }
    }
}

static void fields_put(const struct xcs_field *f, size_t n, uint8_t *p,
                       const void *h)
{
    for (size_t i = 0; i < n; i++) {
        uint8_t *w = p + f[i].wire;
        const uint8_t *from = (const uint8_t *)h + f[i].off;
        uint64_t v8;
        uint32_t v4;
        uint16_t v2;

        if (f[i].width == 8) {
            memcpy(&v8, from, sizeof(v8));
            f[i].be ? xcs_put_be64(w, v8) : xcs_put_le64(w, v8);
        } else if (f[i].width == 4) {
            memcpy(&v4, from, sizeof(v4));
            f[i].be ? xcs_put_be32(w, v4) : xcs_put_le32(w, v4);
        } else {
            memcpy(&v2, from, sizeof(v2));
            f[i].be ? xcs_put_be16(w, v2) : xcs_put_le16(w, v2);
        }
    }
}

/* The xl header's words, after its magic. */
static const struct xcs_field xl_fields[] = {
    FIELD(XCS_XL_MAGIC_LEN, struct xcs_xl_hdr, byteorder, 0),
    FIELD(XCS_XL_MAGIC_LEN + 4, struct xcs_xl_hdr, mflags, 0),
    FIELD(XCS_XL_MAGIC_LEN + 8, struct xcs_xl_hdr, oflags, 0),
    FIELD(XCS_XL_MAGIC_LEN + 12, struct xcs_xl_hdr, optlen, 0),
};

static const struct xcs_field libxl_fields[] = {
    FIELD(0, struct xcs_libxl_hdr, ident, 1),
    FIELD(8, struct xcs_libxl_hdr, version, 1),
    FIELD(12, struct xcs_libxl_hdr, options, 1),
};

static const struct xcs_field ihdr_fields[] = {
    FIELD(0, struct xcs_ihdr, marker, 1),   FIELD(8, struct xcs_ihdr, id, 1),
    FIELD(12, struct xcs_ihdr, version, 1), FIELD(16, struct xcs_ihdr, options, 1),
    FIELD(18, struct xcs_ihdr, res1, 1),    FIELD(20, struct xcs_ihdr, res2, 1),
};

static const struct xcs_field dhdr_fields[] = {
    FIELD(0, struct xcs_dhdr, type, 0),       FIELD(4, struct xcs_dhdr, page_shift, 0),
    FIELD(6, struct xcs_dhdr, res, 0),        FIELD(8, struct xcs_dhdr, xen_major, 0),
    FIELD(12, struct xcs_dhdr, xen_minor, 0),
};

#define XL_MFLAGS_KNOWN (XCS_XL_MFLAG_JSON | XCS_XL_MFLAG_STREAMV2)

const char *xcs_xl_hdr_parse(const uint8_t *p, struct xcs_xl_hdr *h,
                             char *why, size_t whylen)
{
    fields_get(xl_fields, NFIELDS(xl_fields), p, h);
    if (memcmp(p, XCS_XL_MAGIC, XCS_XL_MAGIC_LEN))
        return why_f(why, whylen, "not an xl savefile (bad magic)");
    if (h->byteorder != XCS_XL_BYTEORDER)
        return why_f(why, whylen, "byte order word 0x%08x: written by a host "
                                  "of another byte order", h->byteorder);
    if (h->mflags & ~XL_MFLAGS_KNOWN)
        return why_f(why, whylen, "unknown mandatory flags 0x%x",
                     h->mflags & ~XL_MFLAGS_KNOWN);
    return NULL;
}

const char *xcs_xl_config_check(const struct xcs_xl_hdr *h, uint32_t config_len,
                                char *why, size_t whylen)
{
    if (h->optlen < 4 || config_len > h->optlen - 4)
        return why_f(why, whylen, "config length %u overruns the optional "
                                  "data (%u bytes)", config_len, h->optlen);
    return NULL;
}

void xcs_xl_hdr_build(uint8_t *p, const struct xcs_xl_hdr *h)
{
    memcpy(p, XCS_XL_MAGIC, XCS_XL_MAGIC_LEN);
    fields_put(xl_fields, NFIELDS(xl_fields), p, h);
}

#define LIBXL_OPTS_KNOWN (XCS_LIBXL_OPT_BIG_ENDIAN | XCS_LIBXL_OPT_LEGACY)

const char *xcs_libxl_hdr_parse(const uint8_t *p, struct xcs_libxl_hdr *h,
                                char *why, size_t whylen)
{
    fields_get(libxl_fields, NFIELDS(libxl_fields), p, h);
    if (h->ident != XCS_LIBXL_IDENT)
        return why_f(why, whylen, "bad libxl ident 0x%016llx (expected "
                                  "\"LibxlFmt\")", (unsigned long long)h->ident);
    if (h->version != XCS_LIBXL_VERSION)
        return why_f(why, whylen, "unknown libxl version %u (expected 2)",
                     h->version);
    if (h->options & ~LIBXL_OPTS_KNOWN)
        return why_f(why, whylen, "reserved bits set in libxl options: 0x%x",
                     h->options & ~LIBXL_OPTS_KNOWN);
    if (h->options & XCS_LIBXL_OPT_BIG_ENDIAN)
        return why_f(why, whylen, "big-endian libxl stream: not supported");
    return NULL;
}

void xcs_libxl_hdr_build(uint8_t *p, uint32_t options)
{
    const struct xcs_libxl_hdr h = {XCS_LIBXL_IDENT, XCS_LIBXL_VERSION, options};

    fields_put(libxl_fields, NFIELDS(libxl_fields), p, &h);
}

const char *xcs_ihdr_parse(const uint8_t *p, struct xcs_ihdr *h, char *why,
                           size_t whylen)
{
    fields_get(ihdr_fields, NFIELDS(ihdr_fields), p, h);
    if (h->marker != XCS_IHDR_MARKER)
        return why_f(why, whylen, "bad image marker 0x%016llx",
                     (unsigned long long)h->marker);
    if (h->id != XCS_IHDR_ID)
        return why_f(why, whylen, "bad image id 0x%08x (expected \"XENF\")", h->id);
    if (h->version < XCS_IHDR_VERSION_2 || h->version > XCS_IHDR_VERSION_3)
        return why_f(why, whylen, "unknown image version %u (expected 2 or 3)",
                     h->version);
    if (h->options & ~XCS_IHDR_OPT_BIG_ENDIAN)
        return why_f(why, whylen, "reserved bits set in image options: 0x%x",
                     h->options & ~XCS_IHDR_OPT_BIG_ENDIAN);
    if (h->res1 || h->res2)
        return why_f(why, whylen, "reserved fields set in image header: "
                                  "0x%04x:0x%08x", h->res1, h->res2);
    if (h->options & XCS_IHDR_OPT_BIG_ENDIAN)
        return why_f(why, whylen, "big-endian image: not supported (x86 "
                                  "streams are little-endian)");
    return NULL;
}

void xcs_ihdr_build(uint8_t *p)
{
    /* options 0: little-endian; reserved fields zero */
    const struct xcs_ihdr h = {XCS_IHDR_MARKER, XCS_IHDR_ID, XCS_IHDR_VERSION_3,
                               0, 0, 0};

    fields_put(ihdr_fields, NFIELDS(ihdr_fields), p, &h);
}

const char *xcs_dhdr_parse(const uint8_t *p, struct xcs_dhdr *h, char *why,
                           size_t whylen)
{
    fields_get(dhdr_fields, NFIELDS(dhdr_fields), p, h);
    if (h->type != XCS_DHDR_TYPE_X86_PV && h->type != XCS_DHDR_TYPE_X86_HVM)
        return why_f(why, whylen, "unknown domain type 0x%x", h->type);
    if (h->res)
        return why_f(why, whylen, "reserved field set in domain header: 0x%04x",
                     h->res);
    if (h->page_shift != XCS_PAGE_SHIFT)
        return why_f(why, whylen, "page_shift %u (expected 12)", h->page_shift);
    return NULL;
}

void xcs_dhdr_build(uint8_t *p, uint32_t type, uint32_t xen_major,
                    uint32_t xen_minor)
{
    const struct xcs_dhdr h = {type, XCS_PAGE_SHIFT, 0, xen_major, xen_minor};

    fields_put(dhdr_fields, NFIELDS(dhdr_fields), p, &h);
}

/*----- names -----*/

static const char *const libxc_names[XCS_REC_TYPE_COUNT] = {
    "END", "PAGE_DATA", "X86_PV_INFO", "X86_PV_P2M_FRAMES",
    "X86_PV_VCPU_BASIC", "X86_PV_VCPU_EXTENDED", "X86_PV_VCPU_XSAVE",
    "SHARED_INFO", "X86_TSC_INFO", "HVM_CONTEXT", "HVM_PARAMS", "TOOLSTACK",
    "X86_PV_VCPU_MSRS", "VERIFY", "CHECKPOINT", "CHECKPOINT_DIRTY_PFN_LIST",
    "STATIC_DATA_END", "X86_CPUID_POLICY", "X86_MSR_POLICY",
};

static const char *const libxl_names[XCS_LIBXL_REC_TYPE_COUNT] = {
    "END", "LIBXC_CONTEXT", "EMULATOR_XENSTORE_DATA", "EMULATOR_CONTEXT",
    "CHECKPOINT_END", "CHECKPOINT_STATE",
};

static const char *const legacy_names[XCS_LEGACY_NR_CHUNKS] = {
    "END_OF_BODY", "ENABLE_VERIFY_MODE", "VCPU_INFO", "HVM_IDENT_PT",
    "HVM_VM86_TSS", "TMEM", "TMEM_EXTRA", "TSC_INFO", "HVM_CONSOLE_PFN",
    "LAST_CHECKPOINT", "HVM_ACPI_IOPORTS_LOCATION", "HVM_VIRIDIAN",
    "COMPRESSED_DATA", "ENABLE_COMPRESSION", "HVM_GENERATION_ID_ADDR",
    "HVM_PAGING_RING_PFN", "HVM_ACCESS_RING_PFN", "HVM_SHARING_RING_PFN",
    "TOOLSTACK", "HVM_IOREQ_SERVER_PFN", "HVM_NR_IOREQ_SERVER_PAGES",
};

const char *xcs_libxc_rec_name(uint32_t type)
{
    if (type < XCS_REC_TYPE_COUNT)
        return libxc_names[type];
    return (type & XCS_REC_TYPE_OPTIONAL) ? "optional record" : "unknown record";
}

const char *xcs_libxl_rec_name(uint32_t type)
{
    if (type < XCS_LIBXL_REC_TYPE_COUNT)
        return libxl_names[type];
    return "unknown record";
}

const char *xcs_legacy_chunk_name(int id)
{
    if (id > 0)
        return "page batch";
    if (id > -XCS_LEGACY_NR_CHUNKS)
        return legacy_names[-id];
    return "unknown chunk";
}

const char *xcs_errno_name(int err, char *buf, size_t len)
{
    const char *name = strerrorname_np(err);

    if (name)
        return name;
    snprintf(buf, len, "errno %d", err);
    return buf;
}
