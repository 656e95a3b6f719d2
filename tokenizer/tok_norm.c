/* NFC normalization of text segments through ICU's unorm2 (UTF-8 -> UTF-16 -> NFC -> UTF-8),
 * with a fast path for text that cannot change. */
#include "tok_internal.h"

#include <stdlib.h>
#include <unicode/unorm2.h>
#include <unicode/ustring.h>

int tok_nfc_init(epd_tok_t *tok, epd_err_t *err)
{
    UErrorCode ue = U_ZERO_ERROR;
    const UNormalizer2 *n = unorm2_getNFCInstance(&ue);
    if (U_FAILURE(ue) || !n)
        return epd_err_set(err, -ENOTSUP, "normalizer: ICU has no NFC data: %s", u_errorName(ue));
    tok->nfc_norm = n;
    return 0;
}

int tok_nfc(const epd_tok_t *tok, const uint8_t *p, size_t n, tok_buf_t *out, epd_err_t *err)
{
    /* Every code point below U+0300 is NFC_Quick_Check=Yes with combining class 0, so text
     * without a lead byte >= 0xCC (U+0300 is CC 80) is already NFC. */
    size_t i = 0;
    while (i < n && p[i] < 0xCC)
        i++;
    out->len = 0;
    if (i == n) return 0;
    if (n > INT32_MAX / 2) return epd_err_set(err, -EINVAL, "text of %zu bytes is too long", n);

    const UNormalizer2 *norm = tok->nfc_norm;
    UErrorCode ue = U_ZERO_ERROR;
    int st = -ENOMEM;
    int32_t u16_len = 0;
    UChar *src = malloc((n + 1) * sizeof(UChar)); /* UTF-16 never has more units than UTF-8 bytes */
    UChar *dst = NULL;
    if (!src) goto fail;
    u_strFromUTF8(src, (int32_t)n + 1, &u16_len, (const char *)p, (int32_t)n, &ue);
    if (U_FAILURE(ue)) goto fail_icu;
    int32_t yes = unorm2_spanQuickCheckYes(norm, src, u16_len, &ue);
    if (U_FAILURE(ue)) goto fail_icu;
    if (yes == u16_len) {
        free(src);
        return 0;
    }
    /* NFC output is at most 3x the input in UTF-16 units (Unicode's stated bound). */
    int32_t cap = u16_len * 3 + 16;
    dst = malloc((size_t)cap * sizeof(UChar));
    if (!dst) goto fail;
    int32_t dlen = unorm2_normalize(norm, src, u16_len, dst, cap, &ue);
    if (U_FAILURE(ue)) goto fail_icu;
    int32_t u8_len = 0;
    u_strToUTF8(NULL, 0, &u8_len, dst, dlen, &ue);
    if (ue != U_BUFFER_OVERFLOW_ERROR && U_FAILURE(ue)) goto fail_icu;
    ue = U_ZERO_ERROR;
    if (tok_buf_reserve(out, (size_t)u8_len + 1) < 0) goto fail;
    u_strToUTF8((char *)out->p, u8_len + 1, &u8_len, dst, dlen, &ue);
    if (U_FAILURE(ue)) goto fail_icu;
    out->len = (size_t)u8_len;
    free(dst);
    free(src);
    return 0;
fail_icu:
    st = epd_err_set(err, -EINVAL, "NFC normalization failed: %s", u_errorName(ue));
    free(dst);
    free(src);
    return st;
fail:
    free(dst);
    free(src);
    return epd_err_set(err, st, "NFC normalization: out of memory");
}
