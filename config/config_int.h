/* What config_parse.c (the walk, the entry points) and config_rules.c (the cross-setting
 * rules, the file-system checks) share: the check context and the error reporting. Internal to
 * config/; not a public interface. */
#ifndef EPD_CONFIG_INT_H
#define EPD_CONFIG_INT_H

#include <stddef.h>

#include "config_table.h"

#define PATH_BUF 640 /* display paths: "cluster.peers[255]." + an escaped key */

struct epd_cfg_check_ctx {
    const char *origin;
    unsigned flags;
    epd_config_errors_t *errs;
    unsigned char *bad;      /* [epd_cfg_num_settings]: the setting had an error */
    unsigned char *present;  /* [epd_cfg_num_settings]: the setting appeared in the text */
    unsigned char *peer_bad; /* [EPD_CFG_MAX_PEERS]: the cluster.peers element had an error */
};
typedef struct epd_cfg_check_ctx ctx_t;

/* config_parse.c */
/* snprintf for bounded paths and messages, where a cut is acceptable. */
int cfg_bprintf(char *out, size_t cap, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
/* Collects "ORIGIN: PATH: message", or "ORIGIN: message" without a path. */
void cfg_report(ctx_t *c, const char *path, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
/* The row of s in epd_cfg_settings, -1 if it is none (NULL, or a list element's field). */
int cfg_setting_index(const epd_cfg_setting_t *s);

/* config_rules.c */
/* The file-system checks of every FS_DIR / FS_SECRET setting that parsed without error. */
void cfg_check_files(ctx_t *c, epd_config_t *cfg);

#endif /* EPD_CONFIG_INT_H */
