/* The thread-local last-error slots of libep's creation calls (see last_error.h). */
#include "last_error.h"

#include <stdio.h>

static _Thread_local char slots[EP_LAST_ERROR_SLOTS][EP_LAST_ERROR_MAX];

const char *ep_last_error(ep_last_error_slot_t slot)
{
    return slots[slot];
}

void ep_last_error_clear(ep_last_error_slot_t slot)
{
    slots[slot][0] = '\0';
}

ep_status_t ep_last_error_vset(ep_last_error_slot_t slot, ep_status_t st, const char *fmt,
                               va_list ap)
{
    vsnprintf(slots[slot], sizeof slots[slot], fmt, ap);
    return st;
}

ep_status_t ep_last_error_set(ep_last_error_slot_t slot, ep_status_t st, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    ep_last_error_vset(slot, st, fmt, ap);
    va_end(ap);
    return st;
}
