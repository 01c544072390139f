/*
 * xcs_format.h - wire constants of the stream formats xcsave reads and writes.
 *
 * Written from the public specifications (libxc migration stream revision 3,
 * libxl migration stream revision 2, the xl savefile header, the pre-4.6
 * legacy format); see shared/specs/xen-migration-facts.md sections 2 and 3.
 * One place for every magic number: the engine, the verifier, the legacy
 * reader and the extension all include this header (through codec.h, which
 * holds the byte-order helpers and the header codecs).
 */
#ifndef XCS_FORMAT_H
#define XCS_FORMAT_H

#include <stdint.h>

/*----- libxc image (v2/v3) -----*/

#define XCS_IHDR_MARKER 0xffffffffffffffffULL
#define XCS_IHDR_ID 0x58454e46U /* "XENF" */
#define XCS_IHDR_VERSION_2 2
#define XCS_IHDR_VERSION_3 3
#define XCS_IHDR_OPT_BIG_ENDIAN 0x0001
#define XCS_IHDR_SIZE 24 /* big-endian on the wire */

#define XCS_DHDR_TYPE_X86_PV 1
#define XCS_DHDR_TYPE_X86_HVM 2
#define XCS_DHDR_SIZE 16

#define XCS_RHDR_SIZE 8
#define XCS_REC_ALIGN 8
#define XCS_REC_LENGTH_MAX (128u << 20) /* restorer's cap, like libxc */
#define XCS_REC_TYPE_OPTIONAL 0x80000000U

enum xcs_rec_type {
    XCS_REC_END = 0x00,
    XCS_REC_PAGE_DATA = 0x01,
    XCS_REC_X86_PV_INFO = 0x02,
    XCS_REC_X86_PV_P2M_FRAMES = 0x03,
    XCS_REC_X86_PV_VCPU_BASIC = 0x04,
    XCS_REC_X86_PV_VCPU_EXTENDED = 0x05,
    XCS_REC_X86_PV_VCPU_XSAVE = 0x06,
    XCS_REC_SHARED_INFO = 0x07,
    XCS_REC_X86_TSC_INFO = 0x08,
    XCS_REC_HVM_CONTEXT = 0x09,
    XCS_REC_HVM_PARAMS = 0x0a,
    XCS_REC_TOOLSTACK = 0x0b,
    XCS_REC_X86_PV_VCPU_MSRS = 0x0c,
    XCS_REC_VERIFY = 0x0d,
    XCS_REC_CHECKPOINT = 0x0e,
    XCS_REC_CHECKPOINT_DIRTY_PFN_LIST = 0x0f,
    XCS_REC_STATIC_DATA_END = 0x10,
    XCS_REC_X86_CPUID_POLICY = 0x11,
    XCS_REC_X86_MSR_POLICY = 0x12,
    XCS_REC_TYPE_COUNT = 0x13 /* first reserved mandatory type */
};

/* PAGE_DATA pfn words: type in bits 63-60, reserved 59-52, pfn 51-0. */
#define XCS_PAGE_DATA_PFN_MASK 0x000fffffffffffffULL
#define XCS_PAGE_DATA_RSVD_MASK 0x0ff0000000000000ULL
#define XCS_PAGE_DATA_TYPE_MASK 0xf000000000000000ULL
#define XCS_PAGE_DATA_TYPE_SHIFT 32 /* legacy 32-bit type word << 32 */
#define XCS_MAX_BATCH_SIZE 1024
#define XCS_PAGE_SHIFT 12
#define XCS_PAGE_SIZE (1u << XCS_PAGE_SHIFT)

/* XEN_DOMCTL_PFINFO_* as stored in bits 31-28 of a 32-bit type word. */
#define XCS_PFINFO_LTAB_SHIFT 28
#define XCS_PFINFO_NOTAB (0x0U << 28)
#define XCS_PFINFO_L1TAB (0x1U << 28)
#define XCS_PFINFO_L2TAB (0x2U << 28)
#define XCS_PFINFO_L3TAB (0x3U << 28)
#define XCS_PFINFO_L4TAB (0x4U << 28)
#define XCS_PFINFO_LTABTYPE_MASK (0x7U << 28)
#define XCS_PFINFO_LPINTAB (0x1U << 31)
#define XCS_PFINFO_BROKEN (0xdU << 28)
#define XCS_PFINFO_XALLOC (0xeU << 28)
#define XCS_PFINFO_XTAB (0xfU << 28)
#define XCS_PFINFO_TYPE_MASK (0xfU << 28)
#define XCS_PFINFO_PFN_MASK 0x0fffffffU

/* HVM_PARAM_* numbers carried in HVM_PARAMS (xen/include/public/hvm/params.h). */
#define XCS_HVM_PARAM_STORE_PFN 1
#define XCS_HVM_PARAM_IOREQ_PFN 5
#define XCS_HVM_PARAM_BUFIOREQ_PFN 6
#define XCS_HVM_PARAM_VIRIDIAN 9
#define XCS_HVM_PARAM_IDENT_PT 12
#define XCS_HVM_PARAM_VM86_TSS 15
#define XCS_HVM_PARAM_CONSOLE_PFN 17
#define XCS_HVM_PARAM_ACPI_IOPORTS_LOCATION 19
#define XCS_HVM_PARAM_VM_GENERATION_ID_ADDR 34
#define XCS_HVM_PARAM_PAGING_RING_PFN 27
#define XCS_HVM_PARAM_MONITOR_RING_PFN 28
#define XCS_HVM_PARAM_SHARING_RING_PFN 29
#define XCS_HVM_PARAM_IOREQ_SERVER_PFN 32
#define XCS_HVM_PARAM_NR_IOREQ_SERVER_PAGES 33
#define XCS_HVM_PARAM_VM86_TSS_SIZED 37

/*----- libxl stream (v2) -----*/

#define XCS_LIBXL_IDENT 0x4c6962786c466d74ULL /* "LibxlFmt" */
#define XCS_LIBXL_VERSION 2
#define XCS_LIBXL_OPT_BIG_ENDIAN 0x1U
#define XCS_LIBXL_OPT_LEGACY 0x2U
#define XCS_LIBXL_HDR_SIZE 16 /* big-endian on the wire */

enum xcs_libxl_rec_type {
    XCS_LIBXL_REC_END = 0,
    XCS_LIBXL_REC_LIBXC_CONTEXT = 1,
    XCS_LIBXL_REC_EMULATOR_XENSTORE_DATA = 2,
    XCS_LIBXL_REC_EMULATOR_CONTEXT = 3,
    XCS_LIBXL_REC_CHECKPOINT_END = 4,
    XCS_LIBXL_REC_CHECKPOINT_STATE = 5,
    XCS_LIBXL_REC_TYPE_COUNT = 6
};

#define XCS_EMULATOR_UNKNOWN 0
#define XCS_EMULATOR_QEMU_TRADITIONAL 1
#define XCS_EMULATOR_QEMU_UPSTREAM 2

/*----- xl savefile header -----*/

#define XCS_XL_MAGIC "Xen saved domain, xl format\n \0 \r"
#define XCS_XL_MAGIC_LEN 32
#define XCS_XL_BYTEORDER 0x01020304U
#define XCS_XL_MFLAG_JSON 0x1U
#define XCS_XL_MFLAG_STREAMV2 0x2U
#define XCS_XL_HDR_SIZE (XCS_XL_MAGIC_LEN + 16)

/*----- stream types (helper argv, xc_stream_type_t) -----*/

enum xcs_stream_type {
    XCS_STREAM_PLAIN = 0,
    XCS_STREAM_REMUS = 1,
    XCS_STREAM_COLO = 2
};

/*----- legacy (pre-4.6) libxc format -----*/

#define XCS_LEGACY_MAX_BATCH 1024
#define XCS_LEGACY_MAX_VCPU_ID 4095

enum xcs_legacy_chunk {
    XCS_LEGACY_ENABLE_VERIFY_MODE = -1,
    XCS_LEGACY_VCPU_INFO = -2,
    XCS_LEGACY_HVM_IDENT_PT = -3,
    XCS_LEGACY_HVM_VM86_TSS = -4,
    XCS_LEGACY_TMEM = -5,
    XCS_LEGACY_TMEM_EXTRA = -6,
    XCS_LEGACY_TSC_INFO = -7,
    XCS_LEGACY_HVM_CONSOLE_PFN = -8,
    XCS_LEGACY_LAST_CHECKPOINT = -9,
    XCS_LEGACY_HVM_ACPI_IOPORTS_LOCATION = -10,
    XCS_LEGACY_HVM_VIRIDIAN = -11,
    XCS_LEGACY_COMPRESSED_DATA = -12,
    XCS_LEGACY_ENABLE_COMPRESSION = -13,
    XCS_LEGACY_HVM_GENERATION_ID_ADDR = -14,
    XCS_LEGACY_HVM_PAGING_RING_PFN = -15,
    XCS_LEGACY_HVM_ACCESS_RING_PFN = -16,
    XCS_LEGACY_HVM_SHARING_RING_PFN = -17,
    XCS_LEGACY_TOOLSTACK = -18,
    XCS_LEGACY_HVM_IOREQ_SERVER_PFN = -19,
    XCS_LEGACY_HVM_NR_IOREQ_SERVER_PAGES = -20
};

#define XCS_LEGACY_QEMU_SIG_LEN 21
#define XCS_LEGACY_QEMU_SIG_XEND "QemuDeviceModelRecord" /* read to EOF */
#define XCS_LEGACY_QEMU_SIG_0002 "DeviceModelRecord0002" /* u32 len */
#define XCS_LEGACY_QEMU_SIG_REMUS "RemusDeviceModelState" /* u32 len */

/* Byte order, header codecs and names: codec.h. */

#endif /* XCS_FORMAT_H */
