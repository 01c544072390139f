/*
 * codec.c - the stream formats' pure codecs (see codec.h).
 *
 * Written from shared/specs/xen-migration-facts.md sections 2 and 3.  The
 * reasons below are the texts verify and restore print (after their own
 * "where" prefix), so tests and users see one wording per fault.
 */
#include <stdarg.h>
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

#define XL_MFLAGS_KNOWN (XCS_XL_MFLAG_JSON | XCS_XL_MFLAG_STREAMV2)

const char *xcs_xl_hdr_parse(const uint8_t *p, struct xcs_xl_hdr *h,
                             char *why, size_t whylen)
{
    const uint8_t *w = p + XCS_XL_MAGIC_LEN;

    h->byteorder = xcs_get_le32(w);
    h->mflags = xcs_get_le32(w + 4);
    h->oflags = xcs_get_le32(w + 8);
    h->optlen = xcs_get_le32(w + 12);
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
    uint8_t *w = p + XCS_XL_MAGIC_LEN;

    memcpy(p, XCS_XL_MAGIC, XCS_XL_MAGIC_LEN);
    xcs_put_le32(w, h->byteorder);
    xcs_put_le32(w + 4, h->mflags);
    xcs_put_le32(w + 8, h->oflags);
    xcs_put_le32(w + 12, h->optlen);
}

#define LIBXL_OPTS_KNOWN (XCS_LIBXL_OPT_BIG_ENDIAN | XCS_LIBXL_OPT_LEGACY)

const char *xcs_libxl_hdr_parse(const uint8_t *p, struct xcs_libxl_hdr *h,
                                char *why, size_t whylen)
{
    h->ident = xcs_get_be64(p);
    h->version = xcs_get_be32(p + 8);
    h->options = xcs_get_be32(p + 12);
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
    xcs_put_be64(p, XCS_LIBXL_IDENT);
    xcs_put_be32(p + 8, XCS_LIBXL_VERSION);
    xcs_put_be32(p + 12, options);
}

const char *xcs_ihdr_parse(const uint8_t *p, struct xcs_ihdr *h, char *why,
                           size_t whylen)
{
    h->marker = xcs_get_be64(p);
    h->id = xcs_get_be32(p + 8);
    h->version = xcs_get_be32(p + 12);
    h->options = xcs_get_be16(p + 16);
    h->res1 = xcs_get_be16(p + 18);
    h->res2 = xcs_get_be32(p + 20);
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
    xcs_put_be64(p, XCS_IHDR_MARKER);
    xcs_put_be32(p + 8, XCS_IHDR_ID);
    xcs_put_be32(p + 12, XCS_IHDR_VERSION_3);
    xcs_put_be16(p + 16, 0); /* options: little-endian */
    xcs_put_be16(p + 18, 0);
    xcs_put_be32(p + 20, 0);
}

const char *xcs_dhdr_parse(const uint8_t *p, struct xcs_dhdr *h, char *why,
                           size_t whylen)
{
    h->type = xcs_get_le32(p);
    h->page_shift = xcs_get_le16(p + 4);
    h->res = xcs_get_le16(p + 6);
    h->xen_major = xcs_get_le32(p + 8);
    h->xen_minor = xcs_get_le32(p + 12);
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
    xcs_put_le32(p, type);
    xcs_put_le16(p + 4, XCS_PAGE_SHIFT);
    xcs_put_le16(p + 6, 0);
    xcs_put_le32(p + 8, xen_major);
    xcs_put_le32(p + 12, xen_minor);
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
