/* Read-only access to safetensors checkpoints: one mmapped file (epd_st_file_*) or a Hugging
 * Face checkpoint directory, sharded through model.safetensors.index.json or not
 * (epd_st_ckpt_*). Headers are validated in full at open; tensors are read as fp32.
 *
 * File layout: u64 little-endian header length N | N bytes of JSON header | data section.
 * Header: {"__metadata__": {str: str}?, "<name>": {"dtype": "BF16"|"F16"|"F32"|"F8_E4M3",
 *          "shape": [d0, d1, ...], "data_offsets": [begin, end]}, ...}
 * with offsets relative to the data section; tensors tile the data section exactly. */
#ifndef EPD_SAFETENSORS_H
#define EPD_SAFETENSORS_H

#include "epd_err.h"

#include <stddef.h>
#include <stdint.h>

#define EPD_ST_MAX_DIMS 8
/* Largest JSON header accepted (the reference implementation's bound too): a header is a few
 * hundred bytes per tensor, so this is far above any real checkpoint. */
#define EPD_ST_MAX_HEADER_BYTES (100u * 1024u * 1024u)

typedef enum epd_st_dtype {
    EPD_ST_BF16 = 0,
    EPD_ST_F16 = 1,
    EPD_ST_F32 = 2,
    EPD_ST_F8_E4M3 = 3 /* e4m3fn: bias 7, no infinities, S.1111.111 is NaN; max 448 */
} epd_st_dtype_t;

typedef struct epd_st_tensor {
    const char *name;
    epd_st_dtype_t dtype;
    int ndim;
    int64_t shape[EPD_ST_MAX_DIMS];
    int64_t numel;
    const void *data; /* inside the mapping; numel * dtype size bytes */
    size_t nbytes;
    uint64_t file_offset; /* byte offset of the data in its file */
    const struct epd_st_file *file;
} epd_st_tensor_t;

typedef struct epd_st_file epd_st_file_t;

int epd_st_file_open(const char *path, epd_st_file_t **out, epd_err_t *err);
void epd_st_file_close(epd_st_file_t *f);
const char *epd_st_file_path(const epd_st_file_t *f);
int epd_st_file_count(const epd_st_file_t *f);
const epd_st_tensor_t *epd_st_file_tensor(const epd_st_file_t *f, int i);
/* NULL if the file has no tensor of that name. */
const epd_st_tensor_t *epd_st_file_find(const epd_st_file_t *f, const char *name);

const char *epd_st_dtype_name(epd_st_dtype_t d);
size_t epd_st_dtype_size(epd_st_dtype_t d);

/* A checkpoint directory: model.safetensors.index.json (weight_map: tensor name -> shard file
 * in the same directory) if present, else model.safetensors. */
typedef struct epd_st_ckpt epd_st_ckpt_t;

int epd_st_ckpt_open(const char *dir, epd_st_ckpt_t **out, epd_err_t *err);
void epd_st_ckpt_close(epd_st_ckpt_t *c);
const epd_st_tensor_t *epd_st_ckpt_find(const epd_st_ckpt_t *c, const char *name);
int epd_st_ckpt_num_files(const epd_st_ckpt_t *c);
const char *epd_st_ckpt_dir(const epd_st_ckpt_t *c);

/* Converts a tensor to fp32 into dst[numel] (F8_E4M3: the codes' values, without any scale). */
void epd_st_to_f32(const epd_st_tensor_t *t, float *dst);
/* The value of an e4m3fn code (NaN for 0x7f and 0xff). */
float epd_e4m3_to_f32(uint8_t q);
/* Element i of a tensor of any of the dtypes above, as fp32 (little-endian data). */
float epd_st_elem_f32(const epd_st_tensor_t *t, size_t i);
/* Block dequantisation of rows [r0, r0 + nr) of w (F8_E4M3 [rows][cols]) with scale (any float
 * dtype, [ceil(rows / bn)][ceil(cols / bk)]) into dst[nr][cols]:
 * dst = e4m3(w[r][c]) * fp32(scale[r / bn][c / bk]), one fp32 product. Shapes checked by the
 * caller. */
void epd_st_dequant_fp8_rows(const epd_st_tensor_t *w, const epd_st_tensor_t *scale, int bn, int bk,
                             int64_t r0, int64_t nr, float *dst);
/* Finds `name`, checks its shape equals shape[ndim] and converts it into dst (NULL: only the
 * checks). Errors name the tensor and the expected and actual shapes. */
int epd_st_ckpt_load_f32(const epd_st_ckpt_t *c, const char *name, int ndim, const int64_t *shape,
                         float *dst, epd_err_t *err);

/* Reads a whole (small) file into a NUL-terminated buffer the caller frees; files larger than
 * limit bytes are refused. Shared with the config.json reader. */
int epd_read_text_file(const char *path, size_t limit, char **out, size_t *len, epd_err_t *err);

#endif /* EPD_SAFETENSORS_H */
