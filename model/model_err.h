/* Error reports of the model library: a status (negative errno value) plus a message that
 * names the file, tensor, JSON field or rank at fault. */
#ifndef EPD_MODEL_ERR_H
#define EPD_MODEL_ERR_H

#include <stddef.h>

#define EPD_ERR_MSG_MAX 768

typedef struct epd_err {
    int status; /* 0 or a negative errno value (-EINVAL bad input, -ENOMEM, -EIO, ...) */
    char msg[EPD_ERR_MSG_MAX];
} epd_err_t;

/* Records status and a formatted message in err (NULL allowed) and returns status. */
int epd_err_set(epd_err_t *err, int status, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
void epd_err_clear(epd_err_t *err);

#endif /* EPD_MODEL_ERR_H */
