// What the text API checkers share: a tally of named checks (a failure prints what it got and
// what it wanted), JSON POST/GET against the daemon, and the exit with the tally.
export function checker(base) {
  let failures = 0, checks = 0;
  const c = {
    eq: (a, b) => JSON.stringify(a) === JSON.stringify(b),
    check(cond, what, got, want) {
      checks++;
      if (!cond) {
        failures++;
        console.log(`FAIL ${what}\n  got:  ${JSON.stringify(got)}\n  want: ${JSON.stringify(want)}`);
      }
    },
    async post(path, body) {
      const r = await fetch(base + path, { method: "POST", body: JSON.stringify(body),
                                           headers: { "content-type": "application/json" } });
      const text = await r.text();
      let json = null;
      try { json = JSON.parse(text); } catch { /* reported by the caller */ }
      return { status: r.status, json, text };
    },
    async get(path) {
      const r = await fetch(base + path);
      return { status: r.status, json: await r.json() };
    },
    finish(name) {
      console.log(`${name}: ${checks - failures}/${checks} checks passed`);
      process.exit(failures ? 1 : 0);
    },
  };
  return c;
}
