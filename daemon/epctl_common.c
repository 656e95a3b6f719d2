/* epctl's shared helpers (epctl_common.h). */
#include "epctl_common.h"
#include "epd_clock.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

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
