/* What epctl's command files (epctl.c, epctl_cluster.c) share: integer options with the one
 * error message they all give, and JSON field access (their clock: epd_clock.h). */
#ifndef EPD_EPCTL_COMMON_H
#define EPD_EPCTL_COMMON_H

#include <cJSON.h>

/* Parses option --name of command cmd as an integer in lo..hi into *out. On failure prints
 * "epctl CMD: --NAME 'V' is not LO..HI UNIT" on stderr and returns -1. */
int epctl_opt_int(const char *cmd, const char *name, const char *v, int lo, int hi,
                  const char *unit, int *out);
/* The string field k of o, or dflt. */
const char *epctl_jstr(const cJSON *o, const char *k, const char *dflt);

/* The token epctl sends as "Authorization: Bearer" to every node: read from `file`, or from
 * $EPD_TOKEN_FILE when file is NULL (none if neither). The node's admin token opens every
 * route; its API key opens all but the admin routes. 0, or -1 after printing why on stderr. */
int epctl_token_init(const char *cmd, const char *file);
/* The header line ("Authorization: Bearer ...\r\n") or "" when no token was given. */
const char *epctl_auth_header(void);

#endif /* EPD_EPCTL_COMMON_H */
