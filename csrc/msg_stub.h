/*
 * msg_stub.h - what the generated stubs in xcsave_msgs.h are made of.
 *
 * A stub (xcs_stub_<name>) lists its message's arguments as xcs_arg
 * entries and hands them to xcs_send or xcs_ask (helper_main.c), which
 * frame them the one way the protocol wants: fixed-size values as they
 * are, variable ones (strings, blocks, u64 arrays) after a u32 byte count.
 * Included by xcsave_msgs.h only.
 */
#ifndef XCSAVE_MSG_STUB_H
#define XCSAVE_MSG_STUB_H

#include <stdint.h>
#include <string.h>

/* One argument of a body: n bytes at v, after a u32 byte count when var. */
struct xcs_arg {
    const void *v;
    uint32_t n;
    int var;
};
#define XCS_FIXED(x) {&(x), (uint32_t)sizeof(x), 0}
#define XCS_STR(s) {(s), (uint32_t)strlen(s) + 1, 1}
#define XCS_VAR(v, n) {(v), (n), 1}

/*
 * A question without arguments (XCS_BARE_QUESTIONS in xcsave_msgs.h): its
 * stub, and its trampoline for the backend's library (a callback taking
 * only its data pointer, relayed as the message, the reply its value).
 */
#define XCS_BARE_QUESTION(name, NAME) \
    static inline int xcs_stub_##name(void) \
    { \
        return xcs_ask(XCS_MSG_##NAME, NULL, 0); \
    } \
    static inline int xcs_tramp_##name(void *data) \
    { \
        (void)data; \
        return xcs_stub_##name(); \
    }

#endif /* XCSAVE_MSG_STUB_H */
