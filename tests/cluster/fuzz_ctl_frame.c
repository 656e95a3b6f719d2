/* libFuzzer target for the control-plane frame decoder (control/ctl_frame.c): arbitrary bytes,
 * fed in chunks whose sizes the input chooses, must never crash, hang or read out of bounds;
 * every accepted frame is walked with the accessors the cluster uses. */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "ctl_frame.h"

static void walk(const uint8_t *p, uint32_t len, int depth)
{
    epd_ctl_iter_t it;
    uint16_t tag;
    const uint8_t *v;
    uint32_t vl;
    char s[64];
    uint64_t u64;
    uint32_t u32;
    uint8_t u8;
    epd_ctl_iter_init(&it, p, len);
    while (epd_ctl_iter_next(&it, &tag, &v, &vl)) {
        epd_ctl_get_str(p, len, tag, s, sizeof s);
        epd_ctl_get_u64(p, len, tag, &u64);
        epd_ctl_get_u32(p, len, tag, &u32);
        epd_ctl_get_u8(p, len, tag, &u8);
        if (depth < 2 && (tag == EPD_CTL_T_NODE || tag == EPD_CTL_T_GPU)) walk(v, vl, depth + 1);
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    epd_ctl_decoder_t d;
    epd_ctl_msg_t m;
    if (size == 0) return 0;
    size_t step = (size_t)(data[0] % 17) + 1; /* 1..17-byte reads, like a slow socket */
    epd_ctl_decoder_init(&d, 0);
    for (size_t off = 1; off < size; off += step) {
        size_t n = size - off < step ? size - off : step;
        if (epd_ctl_decoder_feed(&d, data + off, n) < 0) break;
        int r;
        while ((r = epd_ctl_decoder_next(&d, &m)) == 1)
            walk(m.payload, m.len, 0);
        if (r < 0) break;
    }
    epd_ctl_decoder_finish(&d);
    epd_ctl_decoder_fini(&d);

    /* The payload validator on its own, under every frame type. */
    char detail[160];
    for (int t = 0; t <= EPD_CTL_TYPE_MAX + 1; t++)
        if (epd_ctl_payload_check(t, data, (uint32_t)size, 0, detail, sizeof detail) == 0)
            walk(data, (uint32_t)size, 0);
    return 0;
}
