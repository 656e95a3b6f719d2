/* epctl's shared helpers (epctl_common.h). */
#include "epctl_common.h"
#include "epd_clock.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define EPCTL_TOKEN_MAX 1024 /* the daemon's bound (EPD_HTTP_TOKEN_MAX) */

int epctl_opt_int(const char *cmd, const char *name, const char *v, int lo, int hi,
                  const char *unit, int *out)
{
    char *end;
    errno = 0;
    long x = strtol(v, &end, 10);
    if (errno || *end || end == v || x < lo || x > hi) {
        fprintf(stderr, "epctl %s: --%s '%s' is not %d..%d %s\n", cmd, name, v, lo, hi, unit);
        return -1;
    }
    *out = (int)x;
    return 0;
}

const char *epctl_jstr(const cJSON *o, const char *k, const char *dflt)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, k);
    return cJSON_IsString(v) ? v->valuestring : dflt;
}

static char auth_header[EPCTL_TOKEN_MAX + 40];

int epctl_token_init(const char *cmd, const char *file)
{
    char tok[EPCTL_TOKEN_MAX + 2];
    auth_header[0] = 0;
    if (!file) file = getenv("EPD_TOKEN_FILE");
    if (!file || !*file) return 0;
    FILE *f = fopen(file, "rb");
    if (!f) {
        fprintf(stderr, "epctl %s: token file %s: %s\n", cmd, file, strerror(errno));
        return -1;
    }
    size_t n = fread(tok, 1, sizeof tok - 1, f);
    fclose(f);
    tok[n] = 0;
    while (n > 0 &&
           (tok[n - 1] == '\n' || tok[n - 1] == '\r' || tok[n - 1] == ' ' || tok[n - 1] == '\t'))
        tok[--n] = 0;
    int bad = n == 0 || n > EPCTL_TOKEN_MAX;
    for (size_t i = 0; i < n; i++)
        bad |= (unsigned char)tok[i] < 0x21 || (unsigned char)tok[i] > 0x7e;
    if (!bad) snprintf(auth_header, sizeof auth_header, "Authorization: Bearer %s\r\n", tok);
    memset(tok, 0, sizeof tok);
    if (bad) {
        fprintf(stderr, "epctl %s: token file %s: not a token (1..%d printable characters)\n", cmd,
                file, EPCTL_TOKEN_MAX);
        return -1;
    }
    return 0;
}

const char *epctl_auth_header(void)
{
    return auth_header;
}
