/* Helpers shared by the model tests: scratch directories and writing files. */
#ifndef EPD_TEST_MODEL_UTIL_H
#define EPD_TEST_MODEL_UTIL_H

#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* mkdtemp under $TMPDIR (or /tmp); the caller frees the path after rm_tree. */
static inline char *make_tmpdir(void)
{
    const char *base = getenv("TMPDIR");
    char buf[512];
    snprintf(buf, sizeof(buf), "%s/epd-model-XXXXXX", base && *base ? base : "/tmp");
    char *d = mkdtemp(buf);
    return d ? strdup(d) : NULL;
}

/* Removes a directory of plain files (the tests create no subdirectories). */
static inline void rm_tree(const char *dir)
{
    DIR *d = opendir(dir);
    if (d) {
        struct dirent *e;
        char p[1024];
        while ((e = readdir(d))) {
            if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
            snprintf(p, sizeof(p), "%s/%s", dir, e->d_name);
            unlink(p);
        }
        closedir(d);
    }
    rmdir(dir);
}

static inline int write_file(const char *dir, const char *name, const void *data, size_t len)
{
    char p[1024];
    snprintf(p, sizeof(p), "%s/%s", dir, name);
    FILE *f = fopen(p, "wb");
    if (!f) return -1;
    size_t w = len ? fwrite(data, 1, len, f) : 0;
    return (fclose(f) == 0 && w == len) ? 0 : -1;
}

static inline char *path_in(const char *dir, const char *name)
{
    static char p[1024];
    snprintf(p, sizeof(p), "%s/%s", dir, name);
    return p;
}

#endif /* EPD_TEST_MODEL_UTIL_H */
