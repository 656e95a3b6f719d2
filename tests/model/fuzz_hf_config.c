/* libFuzzer target: arbitrary bytes as a Qwen3-MoE config.json. An accepted config must satisfy
 * the invariants the model code relies on. */
#include "hf_config.h"

#include <stdint.h>
#include <stdlib.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    epd_hf_config_t c;
    epd_err_t err;
    if (epd_hf_config_parse((const char *)data, size, "config.json", &c, &err) != 0) return 0;
    if (c.hidden_size < 1 || c.num_hidden_layers < 1 || c.num_attention_heads < 1 ||
        c.num_key_value_heads < 1 || c.num_attention_heads % c.num_key_value_heads ||
        c.head_dim < 2 || c.head_dim % 2 || c.num_experts_per_tok < 1 ||
        c.num_experts_per_tok > c.num_experts || c.vocab_size < 1 || !(c.rms_norm_eps > 0) ||
        !(c.rope_theta > 0))
        abort();
    for (int l = 0; l < c.num_hidden_layers; l++)
        if (!epd_hf_layer_is_moe(&c, l) && c.intermediate_size < 1) abort();
    return 0;
}
