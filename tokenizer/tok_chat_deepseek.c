/* DeepSeek-V3's chat template: recognised by its text (tokenizer_config.json of
 * deepseek-ai/DeepSeek-V3) and rendered natively, quirks included. */
#include "tok_chat.h"

/* Fragments of the template, JSON-decoded (its string literals hold real newlines). Each pins
 * one piece of what the renderer below emits, and the state it keeps: ns.is_first and
 * ns.is_output_first are set once and never reset, so only the very first tool call of a chat
 * opens a <｜tool▁calls▁begin｜> block, and only the first tool output a <｜tool▁outputs▁begin｜>.
 */
static const char *const deepseek_v3_fragments[] = {
    "namespace(is_first=false, is_tool=false, is_output_first=true, system_prompt='', "
    "is_first_sp=true)",
    "{%- if ns.is_first_sp %}{% set ns.system_prompt = ns.system_prompt + message['content'] %}{% "
    "set ns.is_first_sp = false %}{%- else %}{% set ns.system_prompt = ns.system_prompt + '\n\n' "
    "+ message['content'] %}",
    "{{bos_token}}{{ns.system_prompt}}",
    "{%- if message['role'] == 'user' %}{%- set ns.is_tool = false -%}{{'<｜User｜>' + "
    "message['content']}}",
    "{%- if message['role'] == 'assistant' and message['content'] is none %}{%- set ns.is_tool = "
    "false -%}{%- for tool in message['tool_calls']%}{%- if not ns.is_first %}",
    "{{'<｜Assistant｜><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['type'] + "
    "'<｜tool▁sep｜>' "
    "+ tool['function']['name'] + '\n' + '```json' + '\n' + tool['function']['arguments'] + '\n' "
    "+ '```' + '<｜tool▁call▁end｜>'}}{%- set ns.is_first = true -%}{%- else %}",
    "{{'\n' + '<｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] "
    "+ '\n' + '```json' + '\n' + tool['function']['arguments'] + '\n' + '```' + "
    "'<｜tool▁call▁end｜>'}}{{'<｜tool▁calls▁end｜><｜end▁of▁sentence｜>'}}",
    "{%- if message['role'] == 'assistant' and message['content'] is not none %}{%- if "
    "ns.is_tool %}{{'<｜tool▁outputs▁end｜>' + message['content'] + '<｜end▁of▁sentence｜>'}}{%- "
    "set ns.is_tool = false -%}{%- else %}{{'<｜Assistant｜>' + message['content'] + "
    "'<｜end▁of▁sentence｜>'}}",
    "{%- if message['role'] == 'tool' %}{%- set ns.is_tool = true -%}{%- if ns.is_output_first "
    "%}{{'<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>' + message['content'] + "
    "'<｜tool▁output▁end｜>'}}{%- set ns.is_output_first = false %}{%- else %}{{'\n"
    "<｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}",
    "{% if ns.is_tool %}{{'<｜tool▁outputs▁end｜>'}}{% endif %}{% if add_generation_prompt and "
    "not ns.is_tool %}{{'<｜Assistant｜>'}}{% endif %}",
};

/* The template's output expressions; a variant that emits more (a default system prompt, say)
 * is refused. */
#define DEEPSEEK_V3_OUTPUT_EXPRS 12

const char *tok_chat_deepseek_v3_mismatch(const char *tmpl, size_t *n_exprs)
{
    for (size_t i = 0; i < sizeof(deepseek_v3_fragments) / sizeof(deepseek_v3_fragments[0]); i++)
        if (!strstr(tmpl, deepseek_v3_fragments[i])) return deepseek_v3_fragments[i];
    *n_exprs = tok_count(tmpl, "{{");
    return *n_exprs == DEEPSEEK_V3_OUTPUT_EXPRS ? NULL : "";
}

/* One tool call; tool['type'] is "function", the only kind OpenAI's API has. */
static void tool_call(out_t *o, const epd_tok_tool_call_t *t)
{
    tok_chat_puts(o, "function<｜tool▁sep｜>");
    tok_chat_put_user(o, sp(t->name));
    tok_chat_puts(o, "\n```json\n");
    tok_chat_put_user(o, sp(t->arguments));
    tok_chat_puts(o, "\n```<｜tool▁call▁end｜>");
}

void tok_chat_render_deepseek_v3(const char *bos, const epd_tok_chat_msg_t *msgs, size_t n,
                                 const epd_tok_chat_opts_t *opts, out_t *o)
{
    bool is_first = false, is_tool = false, is_output_first = true, first_sp = true;
    if (bos) tok_chat_puts(o, bos);
    for (size_t i = 0; i < n; i++) { /* every system message, in order, joined by a blank line */
        if (!tok_chat_role_is(&msgs[i], "system")) continue;
        if (!first_sp) tok_chat_puts(o, "\n\n");
        tok_chat_put_user(o, sp_n(msgs[i].content, msgs[i].content_len));
        first_sp = false;
    }
    for (size_t i = 0; i < n; i++) {
        const epd_tok_chat_msg_t *m = &msgs[i];
        span_t content = sp_n(m->content, m->content_len);
        if (tok_chat_role_is(m, "user")) {
            is_tool = false;
            tok_chat_puts(o, "<｜User｜>");
            tok_chat_put_user(o, content);
        } else if (tok_chat_role_is(m, "assistant") && !m->content) {
            is_tool = false;
            for (size_t k = 0; k < m->n_tool_calls; k++) {
                if (!is_first) {
                    tok_chat_puts(o, "<｜Assistant｜><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>");
                    tool_call(o, &m->tool_calls[k]);
                    is_first = true;
                } else {
                    tok_chat_puts(o, "\n<｜tool▁call▁begin｜>");
                    tool_call(o, &m->tool_calls[k]);
                    tok_chat_puts(o, "<｜tool▁calls▁end｜><｜end▁of▁sentence｜>");
                }
            }
        } else if (tok_chat_role_is(m, "assistant")) {
            /* content given: tool calls and reasoning_content are not rendered */
            tok_chat_puts(o, is_tool ? "<｜tool▁outputs▁end｜>" : "<｜Assistant｜>");
            tok_chat_put_user(o, content);
            tok_chat_puts(o, "<｜end▁of▁sentence｜>");
            is_tool = false;
        } else if (tok_chat_role_is(m, "tool")) {
            is_tool = true;
            tok_chat_puts(o, is_output_first ? "<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>"
                                             : "\n<｜tool▁output▁begin｜>");
            tok_chat_put_user(o, content);
            tok_chat_puts(o, "<｜tool▁output▁end｜>");
            is_output_first = false;
        }
    }
    if (is_tool) tok_chat_puts(o, "<｜tool▁outputs▁end｜>");
    if (opts && opts->add_generation_prompt && !is_tool) tok_chat_puts(o, "<｜Assistant｜>");
}
