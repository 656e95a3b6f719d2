/* The settings reference in markdown, generated from the settings table and the rules, for
 * config/README.md (epd-config-doc prints it; a test checks the README carries it verbatim). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "config_table.h"

static const char *type_name(const epd_cfg_setting_t *s)
{
    switch (s->type) {
    case EPD_CFG_INT:
    case EPD_CFG_SIZE:
        return "integer";
    case EPD_CFG_STRING:
    case EPD_CFG_ENUM:
        return "string";
    case EPD_CFG_INT_LIST:
        return "array of integers";
    case EPD_CFG_OBJ_LIST:
        return "array of objects";
    case EPD_CFG_BOOL:
        return "boolean";
    case EPD_CFG_NUMBER:
        return "number";
    }
    return "?";
}

static const char *unit(const char *path)
{
    size_t n = strlen(path);
    if (n > 3 && strcmp(path + n - 3, "_ms") == 0) return " ms";
    if (n > 6 && strcmp(path + n - 6, "_bytes") == 0) return " bytes";
    return "";
}

static void print_default(FILE *f, const epd_cfg_setting_t *s)
{
    if (s->flags & EPD_CFG_F_REQUIRED) {
        fputs("required", f);
        return;
    }
    switch (s->type) {
    case EPD_CFG_INT:
    case EPD_CFG_SIZE:
        fprintf(f, "`%lld`", s->def);
        break;
    case EPD_CFG_STRING:
        if (s->flags & EPD_CFG_F_HOSTNAME)
            fputs("host name", f);
        else
            fprintf(f, "`\"%s\"`", s->def_str ? s->def_str : "");
        break;
    case EPD_CFG_ENUM:
        fprintf(f, "`\"%s\"`", epd_cfg_enum_name(s, (int)s->def));
        break;
    case EPD_CFG_INT_LIST:
    case EPD_CFG_OBJ_LIST:
        fputs("`[]`", f);
        break;
    case EPD_CFG_BOOL:
        fputs(s->def ? "`true`" : "`false`", f);
        break;
    case EPD_CFG_NUMBER:
        fprintf(f, "`%g`", s->fdef);
        break;
    }
}

static void print_allowed(FILE *f, const epd_cfg_setting_t *s)
{
    switch (s->type) {
    case EPD_CFG_INT:
    case EPD_CFG_SIZE:
        fprintf(f, "%lld..%lld%s", s->min, s->max, unit(s->path));
        break;
    case EPD_CFG_STRING:
        fprintf(f, "%lld..%lld bytes", s->min, s->max);
        switch (s->charset) {
        case EPD_CFG_CHARS_NAME:
            fputs("; letters, digits, `.` `_` `-`", f);
            break;
        case EPD_CFG_CHARS_HOST:
            fputs("; host name or IP literal (not resolved here)", f);
            break;
        case EPD_CFG_CHARS_PATH:
            fputs("; absolute path or empty", f);
            break;
        case EPD_CFG_CHARS_TEXT:
            fputs("; no control characters", f);
            break;
        }
        if (s->flags & EPD_CFG_F_FS_DIR) fputs("; a readable directory", f);
        if (s->flags & EPD_CFG_F_FS_SECRET)
            fprintf(f, "; a regular file, mode 0600 or stricter, at least %d bytes",
                    EPD_CFG_SECRET_MIN_BYTES);
        break;
    case EPD_CFG_ENUM:
        for (int i = 0; i < s->num_names; i++)
            fprintf(f, "%s`%s`", i ? ", " : "", s->names[i]);
        break;
    case EPD_CFG_INT_LIST:
        fprintf(f, "up to %zu entries, each %lld..%lld%s", s->cap, s->min, s->max,
                (s->flags & EPD_CFG_F_DISTINCT) ? ", distinct" : "");
        break;
    case EPD_CFG_OBJ_LIST:
        fprintf(f, "up to %zu entries", s->cap);
        break;
    case EPD_CFG_BOOL:
        fputs("`true`, `false`", f);
        break;
    case EPD_CFG_NUMBER:
        fprintf(f, "%s%g, %g]", (s->flags & EPD_CFG_F_OPEN_MIN) ? "(" : "[", s->fmin, s->fmax);
        break;
    }
}

static void print_row(FILE *f, const char *prefix, const epd_cfg_setting_t *s)
{
    fprintf(f, "| `%s%s` | %s | ", prefix, s->path, type_name(s));
    print_default(f, s);
    fputs(" | ", f);
    print_allowed(f, s);
    fprintf(f, " | %s | %s |\n", (s->flags & EPD_CFG_F_CLUSTER) ? "yes" : "", s->doc);
}

char *epd_config_doc_markdown(void)
{
    char *text = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&text, &len);
    if (!f) return NULL;

    fputs("| Setting | Type | Default | Allowed | Cluster-wide | Meaning |\n", f);
    fputs("|---|---|---|---|---|---|\n", f);
    for (int i = 0; i < epd_cfg_num_settings; i++) {
        const epd_cfg_setting_t *s = &epd_cfg_settings[i];
        print_row(f, "", s);
        if (s->type == EPD_CFG_OBJ_LIST) {
            char prefix[128];
            snprintf(prefix, sizeof(prefix), "%s[].", s->path);
            for (int j = 0; j < s->num_fields; j++)
                print_row(f, prefix, &s->fields[j]);
        }
    }
    fputs("\nRules across settings:\n\n", f);
    for (int i = 0; i < epd_cfg_num_rules; i++)
        fprintf(f, "- %s\n", epd_cfg_rules[i].doc);
    if (fclose(f) != 0) {
        free(text);
        return NULL;
    }
    return text;
}
