/* libFuzzer target for the config parser: arbitrary bytes must give either a config that
 * survives dump -> parse unchanged, or errors; never a crash, a leak or a hang. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "epd_config.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static epd_config_t cfg, again; /* ~1.1 MiB each: not on the fuzzer's stack */
    epd_config_errors_t errs;
    char why[256];

    int rc = epd_config_parse_ex((const char *)data, size, "fuzz.json", EPD_CONFIG_SKIP_FS_CHECKS,
                                 &cfg, &errs);
    if ((rc == 0) != (errs.count + errs.dropped == 0)) abort();
    for (int i = 0; i < errs.count; i++)
        if (strncmp(errs.msgs[i], "fuzz.json", 9) != 0) abort();
    epd_config_errors_free(&errs);
    if (rc != 0) return 0;

    char *text = epd_config_dump_json(&cfg);
    if (!text) abort();
    rc = epd_config_parse_ex(text, strlen(text), "dump.json", EPD_CONFIG_SKIP_FS_CHECKS, &again,
                             &errs);
    if (rc != 0) {
        epd_config_errors_print(&errs, stderr);
        abort();
    }
    if (epd_config_diff_all(&cfg, &again, why, sizeof(why)) != 0) {
        fprintf(stderr, "round trip changed %s\n", why);
        abort();
    }
    char fa[65], fb[65];
    if (epd_config_fingerprint_hex(&cfg, fa) != 0 || epd_config_fingerprint_hex(&again, fb) != 0 ||
        strcmp(fa, fb) != 0)
        abort();
    epd_config_errors_free(&errs);
    free(text);
    return 0;
}
