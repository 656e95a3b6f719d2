/* libFuzzer target: arbitrary bytes as a safetensors file (header validation and, for files that
 * pass it, fp32 conversion of every tensor). The reader maps files, so the input goes through a
 * memfd. */
#define _GNU_SOURCE
#include "safetensors.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    int fd = memfd_create("fuzz.safetensors", 0);
    if (fd < 0) return 0;
    if (size && write(fd, data, size) != (ssize_t)size) {
        close(fd);
        return 0;
    }
    char path[64];
    snprintf(path, sizeof(path), "/proc/self/fd/%d", fd);
    epd_st_file_t *f = NULL;
    epd_err_t err;
    if (epd_st_file_open(path, &f, &err) == 0) {
        for (int i = 0; i < epd_st_file_count(f); i++) {
            const epd_st_tensor_t *t = epd_st_file_tensor(f, i);
            float *dst = malloc(sizeof(float) * (size_t)(t->numel ? t->numel : 1));
            if (dst) epd_st_to_f32(t, dst);
            free(dst);
            if (epd_st_file_find(f, t->name) != t)
                abort(); /* every listed tensor must be found by its name */
        }
        epd_st_file_close(f);
    }
    close(fd);
    return 0;
}
