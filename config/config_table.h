/* The settings table's types (internal to config/): one row per setting drives parsing,
 * validation, defaults, the JSON dump, the fingerprint and the generated documentation. */
#ifndef EPD_CONFIG_TABLE_H
#define EPD_CONFIG_TABLE_H

#include <stddef.h>

#include "epd_config.h"

/* Most rows the table may have (the walk keeps a seen-flag per row on the stack). */
#define EPD_CFG_MAX_SETTINGS 128

typedef enum epd_cfg_type {
    EPD_CFG_INT,      /* int in [min, max] */
    EPD_CFG_SIZE,     /* size_t in [min, max] */
    EPD_CFG_STRING,   /* char[cap], length in [min, max] bytes, characters per `charset` */
    EPD_CFG_ENUM,     /* int-valued C enum, spelled as one of `names` */
    EPD_CFG_INT_LIST, /* int[cap] + int count, each element in [min, max] */
    EPD_CFG_OBJ_LIST, /* array of structs (elem_size bytes) described by `fields` */
    EPD_CFG_BOOL,     /* int 0/1, spelled true/false; default in `def` */
    EPD_CFG_NUMBER,   /* double in [fmin, fmax] ((fmin, fmax] with F_OPEN_MIN); default fdef */
} epd_cfg_type_t;

typedef enum epd_cfg_charset {
    EPD_CFG_CHARS_TEXT, /* printable: no control characters */
    EPD_CFG_CHARS_NAME, /* [A-Za-z0-9._-]: goes into metric labels and the fingerprint */
    EPD_CFG_CHARS_HOST, /* host name, IPv4 or IPv6 literal: [A-Za-z0-9._:%-] */
    EPD_CFG_CHARS_PATH, /* file path: printable */
} epd_cfg_charset_t;

enum {
    EPD_CFG_F_CLUSTER = 1u << 0,   /* must be equal on every node: part of the fingerprint */
    EPD_CFG_F_REQUIRED = 1u << 1,  /* no default: must be present (list element fields) */
    EPD_CFG_F_DISTINCT = 1u << 2,  /* INT_LIST: no value twice */
    EPD_CFG_F_HOSTNAME = 1u << 3,  /* STRING: the default is this machine's host name */
    EPD_CFG_F_FS_DIR = 1u << 4,    /* STRING path: a readable directory (if not empty) */
    EPD_CFG_F_FS_SECRET = 1u << 5, /* STRING path: a readable owner-only file (if not empty) */
    EPD_CFG_F_OPEN_MIN = 1u << 6   /* NUMBER: fmin itself is not allowed */
};

typedef struct epd_cfg_setting {
    const char *path; /* dotted JSON path; for list element fields relative to the element */
    epd_cfg_type_t type;
    unsigned flags;
    size_t offset;           /* of the value in the containing struct */
    size_t cap;              /* STRING: buffer bytes incl. NUL; lists: most entries */
    size_t count_offset;     /* lists: offset of the int entry count */
    long long min, max;      /* INT, SIZE: value; STRING: length; INT_LIST: each element */
    long long def;           /* INT, SIZE, ENUM, BOOL: default value */
    double fmin, fmax, fdef; /* NUMBER: bounds and default */
    const char *def_str;     /* STRING: default */
    epd_cfg_charset_t charset;
    const char *const *names; /* ENUM: spellings, parallel to values */
    const int *values;
    int num_names;
    const struct epd_cfg_setting *fields; /* OBJ_LIST: the element's settings */
    int num_fields;
    size_t elem_size;
    const char *doc; /* one line for config/README.md */
} epd_cfg_setting_t;

extern const epd_cfg_setting_t epd_cfg_settings[];
extern const int epd_cfg_num_settings;

/* Cross-setting rules, checked after every setting parsed; documented from `doc`. */
struct epd_cfg_check_ctx;
typedef struct epd_cfg_rule {
    void (*check)(struct epd_cfg_check_ctx *ctx, epd_config_t *cfg);
    const char *doc;
} epd_cfg_rule_t;

extern const epd_cfg_rule_t epd_cfg_rules[];
extern const int epd_cfg_num_rules;

/* The setting's value as JSON (NULL if out of memory). */
struct cJSON *epd_cfg_emit(const epd_cfg_setting_t *s, const void *base);
/* The spelling of an ENUM value, NULL if none. */
const char *epd_cfg_enum_name(const epd_cfg_setting_t *s, int value);
const epd_cfg_setting_t *epd_cfg_find(const char *path);

#endif /* EPD_CONFIG_TABLE_H */
