/* epd_err_t: formatting of the model library's error messages. */
#include "model_err.h"

#include <stdarg.h>
#include <stdio.h>

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
