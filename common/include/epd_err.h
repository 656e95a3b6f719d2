/* The error contract above libep: a status (a negative errno value, or one of EPD_E* below)
 * plus a message that names the file, JSON field, tensor, peer or rank at fault. */
#ifndef EPD_ERR_H
#define EPD_ERR_H

#include <stddef.h>

#define EPD_ERR_MSG_MAX 768

/* Statuses beyond errno's range (negated, as errno values are). */
#define EPD_STATUS_MAP(X)                                                                          \
    X(EXCHANGE, 10001, "the expert-parallel exchange failed (a peer, a timeout: see the message)")

enum {
#define EPD_STATUS_ENUM(name, num, text) EPD_E##name = -(num),
    EPD_STATUS_MAP(EPD_STATUS_ENUM)
#undef EPD_STATUS_ENUM
};

typedef struct epd_err {
    int status; /* 0, a negative errno value (-EINVAL bad input, -ENOMEM, -EIO, ...) or EPD_E* */
    char msg[EPD_ERR_MSG_MAX];
} epd_err_t;

/* Records status and a formatted message in err (NULL allowed) and returns status. */
int epd_err_set(epd_err_t *err, int status, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
void epd_err_clear(epd_err_t *err);
/* A status in words: EPD_E* from the table above, else strerror(-status). */
const char *epd_status_str(int status);

#endif /* EPD_ERR_H */
