/* Why the last call of a kind failed on this thread, for the calls of libep that fail before
 * there is an object to hold the message (group, tcp bootstrap and tcp wire creation): one
 * thread-local slot per kind (internal). */
#ifndef EP_LAST_ERROR_H
#define EP_LAST_ERROR_H

#include "ep.h"

#include <stdarg.h>

/* Size of a slot's message, NUL included. */
#define EP_LAST_ERROR_MAX 512

typedef enum ep_last_error_slot {
    EP_LAST_ERROR_GROUP,     /* ep_group_create: ep_group_last_error(NULL) */
    EP_LAST_ERROR_BOOTSTRAP, /* ep_tcp_bootstrap_*: ep_tcp_bootstrap_last_error() */
    EP_LAST_ERROR_TCP_WIRE,  /* ep_wire_tcp_create: ep_wire_tcp_create_error() */
    EP_LAST_ERROR_SLOTS
} ep_last_error_slot_t;

/* The slot's message on this thread ("" when none was set since the last clear). */
const char *ep_last_error(ep_last_error_slot_t slot);
void ep_last_error_clear(ep_last_error_slot_t slot);
/* Formats the slot's message and returns st, so that a failure reads
 * `return ep_last_error_set(slot, EP_ERR_INVALID, "rank %d: ...", rank);`. */
ep_status_t ep_last_error_set(ep_last_error_slot_t slot, ep_status_t st, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
ep_status_t ep_last_error_vset(ep_last_error_slot_t slot, ep_status_t st, const char *fmt,
                               va_list ap) __attribute__((format(printf, 3, 0)));

#endif /* EP_LAST_ERROR_H */
