/* epd_err_t: recording a status and its message. */
#include "epd_err.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

int epd_err_set(epd_err_t *err, int status, const char *fmt, ...)
{
    if (err) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err->msg, sizeof(err->msg), fmt, ap);
        va_end(ap);
        err->status = status;
    }
    return status;
}

void epd_err_clear(epd_err_t *err)
{
    if (err) {
        err->status = 0;
        err->msg[0] = '\0';
    }
}

const char *epd_status_str(int status)
{
    switch (status) {
#define EPD_STATUS_CASE(name, num, text)                                                           \
    case EPD_E##name:                                                                              \
        return text;
        EPD_STATUS_MAP(EPD_STATUS_CASE)
#undef EPD_STATUS_CASE
    default:
        return strerror(-status);
    }
}
