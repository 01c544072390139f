/*
 * xcs_skeleton.h - stream skeletons: a v2/v3 migration stream with each
 * page's 4096 bytes replaced by an 8-byte digest, every other byte as
 * written (make), and a stream inflated back from one (inflate).
 *
 * The skeleton's *body* (what this file makes and reads; xcsave/skeleton.py
 * puts a header in front and compresses it, docs/skeletons.md) is the
 * stream, byte for byte, except that in every PAGE_DATA record the page
 * bytes after the pfn words become one little-endian u64 per page:
 * xcs_skel_digest of the page (XXH64, seed 0).  The record header keeps its
 * length as written, so the body is not itself a stream; it is walked by
 * the same walker (walker.h), whose page-batch client consumes digests
 * instead of pages.  Bytes after the outermost END (a converted image's
 * qemu trailer) are kept as they are.
 *
 * Inflating writes the body back with each digest replaced by
 * xcs_skel_page(digest): the all-zero page for the zero page's digest (so
 * zero pages stay zero), else 4096 bytes of splitmix64 seeded with the
 * digest (the same digest, the same page).  The record sequence, every
 * record length and every non-page byte are the original's.
 *
 * Both walks are done over a mapping (the input must be a regular file;
 * the body is put in a memfd), so a length that lies ends the walk at the
 * end of the mapping: nothing is allocated by a field's word.
 *
 * Conventions: 0 on success; XCS_SKEL_INVALID with info->err saying where
 * and why (the walker's one error shape); -1 with errno on an I/O or
 * resource failure (info->err.reason names the call).
 */
#ifndef XCS_SKELETON_H
#define XCS_SKELETON_H

#include <stddef.h>
#include <stdint.h>

#include "codec.h"
#include "walker.h"

#ifdef __cplusplus
extern "C" {
#endif

#define XCS_SKEL_INVALID 1
#define XCS_SKEL_DIGEST_LEN 8
/* The largest body either side handles: the pfns and digests of 32 GiB of
 * pages (16 bytes a page), and the records around them. */
#define XCS_SKEL_BODY_MAX (128ull << 20)
/* Records a walk lists: a million (32 MiB of list; a 32 GiB guest's
 * single-pass save has 8192 PAGE_DATA records). */
#define XCS_SKEL_RECORDS_MAX (1u << 20)

enum xcs_skel_layer { XCS_SKEL_LIBXC = 0, XCS_SKEL_LIBXL = 1 };

/* One record of the stream, in order. */
struct xcs_skel_record {
    uint64_t offset; /* its header's offset in the (original or inflated) stream */
    uint32_t type;
    uint32_t length; /* as in its header (PAGE_DATA: pages included) */
    uint32_t count;  /* PAGE_DATA: pfn words */
    uint32_t pages;  /* PAGE_DATA: pages with data (digests in the body) */
    uint8_t layer;   /* enum xcs_skel_layer */
};

struct xcs_skel_info {
    enum xcs_fmt fmt;          /* the stream's (auto resolved by make) */
    uint64_t stream_size;      /* the original's (make) / inflated (inflate) */
    uint64_t stream_xxh64;     /* make: XXH64 of the whole original */
    uint64_t body_size;
    uint64_t pages;            /* pages with data (= digests) */
    uint64_t zero_pages;       /* of which all-zero */
    uint64_t trailing;         /* bytes after the outermost END */

    struct xcs_skel_record *records; /* malloc'd, nrecords of them */
    size_t nrecords;
    size_t records_cap;

    struct xcs_stream_headers hdrs; /* as the walker parsed them */
    uint64_t libxc_offset;     /* in the stream */
    uint32_t checkpoints;
    int ended;                 /* 1 END, 2 EOF after a checkpoint */

    struct xcs_stream_error err;
};

/*
 * Make the body of in_fd's stream (a regular file, from its offset to EOF)
 * of format fmt (XCS_FMT_AUTO: sniffed; legacy is refused).  *body is
 * malloc'd (the caller frees it), *body_len its length.
 */
int xcs_skel_make(int in_fd, enum xcs_fmt fmt, enum xcs_stream_type type,
                  uint8_t **body, size_t *body_len, struct xcs_skel_info *info);

/*
 * Walk a body of format fmt (xl, libxl or libxc) and write the inflated
 * stream to out_fd (from its offset, in order), or with out_fd -1 only
 * walk it (info: the records, the sizes the stream would have).
 */
int xcs_skel_inflate(const uint8_t *body, size_t body_len, enum xcs_fmt fmt,
                     enum xcs_stream_type type, int out_fd,
                     struct xcs_skel_info *info);

/* Free info->records. */
void xcs_skel_info_release(struct xcs_skel_info *info);

/* A page's digest (XXH64, seed 0, of its 4096 bytes). */
uint64_t xcs_skel_digest(const uint8_t *page);
/* The page inflate writes for a digest. */
void xcs_skel_page(uint64_t digest, uint8_t *page);

#ifdef __cplusplus
}
#endif

#endif /* XCS_SKELETON_H */
