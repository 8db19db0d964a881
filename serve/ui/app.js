// loraplex playground: compare models side by side, chat, manage adapters, fine-tune and watch the loss.
// Talks only to this server's /v1 API (and /status), with the key the user enters (localStorage, Bearer header).
import { html, render, useState, useEffect, useRef, useCallback } from "./vendor/htm-preact-3.1.1.module.js";

const KEY_STORAGE = "loraplex.apiKey";
const TABS = [["compare", "Compare"], ["chat", "Chat"], ["adapters", "Adapters"], ["fine-tuning", "Fine-tuning"]];

// ---- the API --------------------------------------------------------------------------------------------------

function headers(extra = {}) {
  const key = localStorage.getItem(KEY_STORAGE);
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

async function api(path, { method = "GET", body, form, signal } = {}) {
  const init = { method, signal, headers: headers(body !== undefined ? { "Content-Type": "application/json" } : {}) };
  if (body !== undefined) init.body = JSON.stringify(body);
  if (form !== undefined) init.body = form;
  const r = await fetch(path, init);
  const text = await r.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch { data = null; }
  if (!r.ok) throw new Error((data && data.error && data.error.message) || `${r.status} ${r.statusText}`);
  return data;
}

// POST a streaming request; calls onEvent(parsed JSON) per SSE data line; resolves at [DONE].
async function stream(path, body, onEvent, signal) {
  const r = await fetch(path, { method: "POST", signal, body: JSON.stringify({ ...body, stream: true }),
                                headers: headers({ "Content-Type": "application/json" }) });
  if (!r.ok) {
    let message = `${r.status} ${r.statusText}`;
    try { message = (await r.json()).error.message; } catch { /* not JSON */ }
    throw new Error(message);
  }
  const reader = r.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let at;
    while ((at = buffer.indexOf("\n")) >= 0) {
      const line = buffer.slice(0, at).trim();
      buffer = buffer.slice(at + 1);
      if (!line.startsWith("data:")) continue;
      const data = line.slice(5).trim();
      if (data === "[DONE]") return;
      const event = JSON.parse(data);
      if (event.error) throw new Error(event.error.message);
      onEvent(event);
    }
  }
}

async function listAll(path) { // every page of a list endpoint with OpenAI's `after` cursor
  const out = [];
  let after = null;
  for (let i = 0; i < 50; i++) {
    const page = await api(`${path}${path.includes("?") ? "&" : "?"}limit=100${after ? `&after=${after}` : ""}`);
    out.push(...page.data);
    if (!page.has_more || !page.data.length) return out;
    after = page.data[page.data.length - 1].id;
  }
  return out;
}

// ---- small helpers --------------------------------------------------------------------------------------------

function copy(text) { // the clipboard where the browser allows it (a secure context); the text stays selectable
  if (navigator.clipboard && window.isSecureContext) navigator.clipboard.writeText(text).catch(() => {});
}

const fmtBytes = (n) => n >= 1 << 20 ? `${(n / (1 << 20)).toFixed(1)} MiB` : `${(n / 1024).toFixed(0)} KiB`;
const fmtTime = (s) => new Date(s * 1000).toLocaleString();

function wordDiff(a, b) { // -> [[word, same?]] for b against a (longest common subsequence of words)
  const x = a.split(/(\s+)/), y = b.split(/(\s+)/);
  if (x.length * y.length > 4e6) return y.map((w) => [w, true]);
  const dp = Array.from({ length: x.length + 1 }, () => new Uint32Array(y.length + 1));
  for (let i = x.length - 1; i >= 0; i--)
    for (let j = y.length - 1; j >= 0; j--)
      dp[i][j] = x[i] === y[j] ? dp[i + 1][j + 1] + 1 : Math.max(dp[i + 1][j], dp[i][j + 1]);
  const out = [];
  let i = 0, j = 0;
  while (j < y.length) {
    if (i < x.length && x[i] === y[j]) { out.push([y[j], true]); i++; j++; }
    else if (i < x.length && dp[i + 1][j] >= dp[i][j + 1]) i++;
    else { out.push([y[j], false]); j++; }
  }
  return out;
}

function useModels(refresh) {
  const [models, setModels] = useState([]);
  const [examples, setExamples] = useState({});
  const [error, setError] = useState(null);
  useEffect(() => {
    let live = true;
    (async () => {
      try {
        const names = (await api("/v1/models")).data.map((m) => m.id);
        let pinned = []; // every version of a republished adapter, as `name@N` (the server pins it)
        const byAdapter = {};
        try {
          for (const a of (await api("/v1/adapters")).data) {
            if (a.version > 1) for (let n = 1; n <= a.version; n++) pinned.push(`${a.id}@${n}`);
            if (a.metadata && a.metadata.examples) byAdapter[a.id] = a.metadata.examples;
          }
        } catch { pinned = []; }
        if (live) setExamples(byAdapter);
        let checkpoints = [];
        try {
          const jobs = (await api("/v1/fine_tuning/jobs?limit=10")).data;
          for (const job of jobs) {
            const page = await api(`/v1/fine_tuning/jobs/${job.id}/checkpoints?limit=10`);
            checkpoints.push(...page.data.map((c) => c.fine_tuned_model_checkpoint));
          }
        } catch { checkpoints = []; } // fine-tuning off on this server
        if (live) { setModels([...names, ...pinned, ...checkpoints.filter((c) => !names.includes(c))]); setError(null); }
      } catch (e) { if (live) setError(e.message); }
    })();
    return () => { live = false; };
  }, [refresh]);
  return [models, error, examples];
}

function ModelSelect({ models, value, onChange, label, id }) {
  return html`<label for=${id}>${label}
    <select id=${id} value=${value} onChange=${(e) => onChange(e.target.value)}>
      ${models.map((m) => html`<option value=${m}>${m}</option>`)}
    </select></label>`;
}

// ---- status strip ---------------------------------------------------------------------------------------------

function StatusStrip() {
  const [s, setS] = useState(null);
  useEffect(() => {
    let live = true;
    const poll = async () => {
      try { const r = await fetch("/status"); if (live) setS(await r.json()); } catch { if (live) setS(null); }
    };
    poll();
    const timer = setInterval(poll, 2000);
    return () => { live = false; clearInterval(timer); };
  }, []);
  if (!s) return html`<div class="status" role="status"><span class="down">server unreachable</span></div>`;
  const jobs = s.fine_tuning_jobs || {};
  return html`<div class="status" role="status" aria-live="off">
    <span class=${s.ready ? "ready" : "down"}>${s.ready ? "engine ready" : "engine not ready"}</span>
    <span>${s.model}</span>
    <span>running ${s.num_requests_running} · waiting ${s.num_requests_waiting}</span>
    <span>KV cache ${(100 * s.kv_cache_usage).toFixed(1)}%</span>
    <span>${s.generation_tokens_per_s === null ? "…" : s.generation_tokens_per_s.toFixed(1)} tok/s</span>
    ${jobs.running ? html`<span>training: ${jobs.running} job(s), ${s.training_share === null ? "…" :
      (100 * s.training_share).toFixed(0)}% of the engine loop</span>` : null}
  </div>`;
}

// ---- compare --------------------------------------------------------------------------------------------------

function requestBody(settings, model, seed) {
  const body = { model, temperature: Number(settings.temperature), top_p: Number(settings.top_p),
                 max_tokens: Number(settings.max_tokens), stream_options: { include_usage: true } };
  if (seed !== "" && seed !== null && seed !== undefined) body.seed = Number(seed);
  const stop = settings.stop.split(",").map((s) => s.trim()).filter(Boolean);
  if (stop.length) body.stop = stop;
  if (settings.mode === "chat") {
    body.messages = [...(settings.system ? [{ role: "system", content: settings.system }] : []),
                     { role: "user", content: settings.prompt }];
    if (settings.schema.trim())
      body.response_format = { type: "json_schema", json_schema: { name: "output", schema: JSON.parse(settings.schema) } };
  } else {
    body.prompt = settings.prompt;
  }
  return body;
}

function code(settings, model, seed) {
  const body = requestBody(settings, model, seed);
  delete body.stream_options;
  const path = settings.mode === "chat" ? "chat/completions" : "completions";
  const json = JSON.stringify(body, null, 2);
  const curl = `curl -s ${location.origin}/v1/${path} \\\n  -H "Authorization: Bearer $LORAPLEX_API_KEY" \\\n` +
    `  -H "Content-Type: application/json" \\\n  -d '${json.replace(/'/g, "'\\''")}'`;
  const call = settings.mode === "chat" ? "client.chat.completions.create" : "client.completions.create";
  const args = Object.entries(body).map(([k, v]) => `    ${k}=${JSON.stringify(v).replace(/\btrue\b/g, "True")
    .replace(/\bfalse\b/g, "False").replace(/\bnull\b/g, "None")},`).join("\n");
  const python = `import os\nfrom openai import OpenAI\n\nclient = OpenAI(base_url="${location.origin}/v1", ` +
    `api_key=os.environ["LORAPLEX_API_KEY"])\nresult = ${call}(\n${args}\n)\n` +
    (settings.mode === "chat" ? "print(result.choices[0].message.content)" : "print(result.choices[0].text)");
  return { curl, python };
}

function Column({ index, models, column, setColumn, diffWith, showDiff, settings, seed }) {
  const [showCode, setShowCode] = useState(false);
  const r = column.result;
  let body = r.text;
  if (showDiff && diffWith !== null && r.text)
    body = wordDiff(diffWith, r.text).map(([w, same]) => same ? w : html`<mark class="diff-add">${w}</mark>`);
  const snippets = showCode ? code(settings, column.model, seed) : null;
  return html`<div class="column" data-column=${index}>
    <${ModelSelect} id=${`column-model-${index}`} label=${`Model ${index + 1}`} models=${models} value=${column.model}
      onChange=${(model) => setColumn({ ...column, model })} />
    <div class="output" aria-live="polite" aria-label=${`Output of model ${index + 1}`}>${body}</div>
    ${r.error ? html`<div class="error" role="alert">${r.error}</div>` : null}
    <div class="timings">
      <span data-metric="ttft">TTFT ${r.ttft === null ? "–" : `${r.ttft.toFixed(0)} ms`}</span>
      <span data-metric="rate">${r.rate === null ? "–" : `${r.rate.toFixed(1)} tok/s`}</span>
      <span data-metric="tokens">${r.tokens ?? "–"} tokens</span>
      <span data-metric="finish">finish: ${r.finish ?? "–"}</span>
    </div>
    <div class="row"><button type="button" onClick=${() => setShowCode(!showCode)} aria-expanded=${showCode}>
      ${showCode ? "Hide code" : "Copy as curl / Python"}</button></div>
    ${snippets ? html`<pre class="code" aria-label="curl">${snippets.curl}</pre>
      <button type="button" onClick=${() => copy(snippets.curl)}>Copy curl</button>
      <pre class="code" aria-label="Python">${snippets.python}</pre>
      <button type="button" onClick=${() => copy(snippets.python)}>Copy Python</button>` : null}
  </div>`;
}

const EMPTY = { text: "", ttft: null, rate: null, tokens: null, finish: null, error: null };

function Compare({ models, preset, examples }) {
  const [settings, setSettings] = useState({ mode: "chat", prompt: "Write a haiku about the sea.", system: "",
    temperature: 0, top_p: 1, max_tokens: 64, seed: 0, sameSeed: true, stop: "", schema: "" });
  const [columns, setColumns] = useState([]);
  const [running, setRunning] = useState(false);
  const [showDiff, setShowDiff] = useState(false);
  const controllers = useRef([]);
  useEffect(() => {
    if (preset) setColumns(preset.map((model) => ({ model, result: EMPTY })));
  }, [preset]);
  useEffect(() => {
    if (!columns.length && models.length)
      setColumns([0, 1].map((i) => ({ model: models[i % models.length], result: EMPTY })));
  }, [models]);
  const set = (k) => (e) => setSettings({ ...settings, [k]: e.target.type === "checkbox" ? e.target.checked : e.target.value });
  const setColumn = (i) => (c) => setColumns((cs) => cs.map((x, j) => j === i ? c : x));
  const seedFor = (i) => settings.sameSeed ? settings.seed : (settings.seed === "" ? "" : Number(settings.seed) + i);

  const run = async () => {
    if (settings.schema.trim()) {
      try { JSON.parse(settings.schema); } catch (e) { alertColumns(`the JSON schema is not JSON: ${e.message}`); return; }
    }
    setRunning(true);
    controllers.current = columns.map(() => new AbortController());
    const path = settings.mode === "chat" ? "/v1/chat/completions" : "/v1/completions";
    await Promise.all(columns.map(async (column, i) => {
      const t0 = performance.now();
      let first = null, text = "", tokens = null, finish = null, chunks = 0;
      const update = (extra = {}) => setColumns((cs) => cs.map((x, j) => j !== i ? x : { ...x, result: {
        text, ttft: first === null ? null : first - t0, tokens: tokens ?? chunks, finish,
        rate: first === null ? null : (tokens ?? chunks) / Math.max(1e-3, (performance.now() - first) / 1000),
        error: null, ...extra } }));
      update();
      try {
        await stream(path, requestBody(settings, column.model, seedFor(i)), (event) => {
          if (event.usage) { tokens = event.usage.completion_tokens; }
          for (const choice of event.choices || []) {
            const piece = settings.mode === "chat" ? (choice.delta && choice.delta.content) || "" : choice.text || "";
            if (piece) { if (first === null) first = performance.now(); text += piece; chunks++; }
            if (choice.finish_reason) finish = choice.finish_reason;
          }
          update();
        }, controllers.current[i].signal);
        update();
      } catch (e) {
        update({ error: e.name === "AbortError" ? "stopped" : e.message });
      }
    }));
    setRunning(false);
  };
  const alertColumns = (error) => setColumns((cs) => cs.map((c) => ({ ...c, result: { ...EMPTY, error } })));
  const stop = () => controllers.current.forEach((c) => c.abort());
  const resize = (n) => setColumns((cs) => n > cs.length
    ? [...cs, ...Array.from({ length: n - cs.length }, (_, k) => ({ model: models[(cs.length + k) % models.length] || "",
                                                                        result: EMPTY }))]
    : cs.slice(0, n));

  return html`<section class="panel" aria-labelledby="compare-title">
    <h2 id="compare-title">Compare models</h2>
    <div class="row">
      <fieldset class="row"><legend class="visually-hidden">Mode</legend>
        <label class="inline"><input type="radio" name="mode" value="chat" checked=${settings.mode === "chat"}
          onChange=${set("mode")} /> Chat</label>
        <label class="inline"><input type="radio" name="mode" value="completion" checked=${settings.mode === "completion"}
          onChange=${set("mode")} /> Completion</label>
      </fieldset>
      <label for="compare-columns">Columns
        <select id="compare-columns" value=${columns.length} onChange=${(e) => resize(Number(e.target.value))}>
          ${[1, 2, 3, 4].map((n) => html`<option value=${n}>${n}</option>`)}
        </select></label>
      <label for="temperature">Temperature<input id="temperature" type="number" step="0.1" min="0" max="2"
        value=${settings.temperature} onInput=${set("temperature")} /></label>
      <label for="top-p">Top p<input id="top-p" type="number" step="0.05" min="0" max="1" value=${settings.top_p}
        onInput=${set("top_p")} /></label>
      <label for="max-tokens">Max tokens<input id="max-tokens" type="number" min="1" value=${settings.max_tokens}
        onInput=${set("max_tokens")} /></label>
      <label for="seed">Seed<input id="seed" type="number" value=${settings.seed} onInput=${set("seed")} /></label>
      <label class="inline"><input type="checkbox" checked=${settings.sameSeed} onChange=${set("sameSeed")} />
        Same seed in every column</label>
      <label for="stop">Stop (comma-separated)<input id="stop" value=${settings.stop} onInput=${set("stop")} /></label>
    </div>
    ${settings.mode === "chat" ? html`<label class="wide" for="system">System prompt
      <input id="system" value=${settings.system} onInput=${set("system")} /></label>` : null}
    ${(() => {
      const offered = columns.flatMap((c) => (examples[c.model.split("@")[0]] || []).map((p) => [c.model, p]));
      return offered.length ? html`<label class="wide" for="examples">Example prompts of the chosen adapters
        <select id="examples" onChange=${(e) => e.target.value && setSettings({ ...settings, prompt: e.target.value })}>
          <option value="">choose…</option>
          ${offered.map(([m, p]) => html`<option value=${p}>${m}: ${p.slice(0, 80)}</option>`)}
        </select></label>` : null;
    })()}
    <label class="wide" for="prompt">Prompt<textarea id="prompt" value=${settings.prompt} onInput=${set("prompt")}></textarea></label>
    ${settings.mode === "chat" ? html`<details><summary>Structured output (JSON schema)</summary>
      <label class="wide" for="schema">JSON schema the answer must follow (empty: free text)
        <textarea id="schema" value=${settings.schema} onInput=${set("schema")}></textarea></label></details>` : null}
    <div class="row">
      <button class="primary" type="button" onClick=${run} disabled=${running || !columns.length}>Run</button>
      <button type="button" onClick=${stop} disabled=${!running}>Stop</button>
      <label class="inline"><input type="checkbox" checked=${showDiff} onChange=${(e) => setShowDiff(e.target.checked)}
        disabled=${columns.length < 2} /> Highlight differences from model 1</label>
    </div>
    <div class=${`columns n${Math.max(1, columns.length)}`}>
      ${columns.map((c, i) => html`<${Column} index=${i} models=${models} column=${c} setColumn=${setColumn(i)}
        settings=${settings} seed=${seedFor(i)} showDiff=${showDiff && i > 0}
        diffWith=${i > 0 ? columns[0].result.text : null} />`)}
    </div>
  </section>`;
}

// ---- chat -----------------------------------------------------------------------------------------------------

function Chat({ models }) {
  const [model, setModel] = useState("");
  const [system, setSystem] = useState("");
  const [messages, setMessages] = useState([]);
  const [input, setInput] = useState("");
  const [busy, setBusy] = useState(false);
  const [error, setError] = useState(null);
  const controller = useRef(null);
  useEffect(() => { if (!model && models.length) setModel(models[0]); }, [models]);

  const reply = async (history) => {
    setBusy(true); setError(null);
    controller.current = new AbortController();
    let text = "";
    setMessages([...history, { role: "assistant", content: "" }]);
    try {
      await stream("/v1/chat/completions", { model, max_tokens: 256, temperature: 0.7,
        messages: [...(system ? [{ role: "system", content: system }] : []), ...history] }, (event) => {
        for (const c of event.choices || []) text += (c.delta && c.delta.content) || "";
        setMessages([...history, { role: "assistant", content: text }]);
      }, controller.current.signal);
    } catch (e) {
      if (e.name !== "AbortError") setError(e.message);
    }
    setBusy(false);
  };
  const send = (e) => {
    e.preventDefault();
    if (!input.trim() || busy) return;
    const history = [...messages, { role: "user", content: input }];
    setInput("");
    reply(history);
  };
  const regenerate = () => {
    const last = messages.map((m) => m.role).lastIndexOf("user");
    if (last >= 0) reply(messages.slice(0, last + 1));
  };
  return html`<section class="panel" aria-labelledby="chat-title">
    <h2 id="chat-title">Chat</h2>
    <div class="row">
      <${ModelSelect} id="chat-model" label="Model" models=${models} value=${model} onChange=${setModel} />
      <label class="grow" for="chat-system">System prompt<input id="chat-system" value=${system}
        onInput=${(e) => setSystem(e.target.value)} /></label>
      <button type="button" onClick=${() => setMessages([])} disabled=${busy}>Clear</button>
    </div>
    <div class="chat" aria-live="polite" aria-label="Conversation">
      ${messages.map((m) => html`<div class=${`msg ${m.role}`} data-role=${m.role}>${m.content}</div>`)}
    </div>
    ${error ? html`<div class="error" role="alert">${error}</div>` : null}
    <form class="row" onSubmit=${send}>
      <label class="grow" for="chat-input">Message<textarea id="chat-input" value=${input}
        onInput=${(e) => setInput(e.target.value)}></textarea></label>
      <button class="primary" type="submit" disabled=${busy || !model}>Send</button>
      <button type="button" onClick=${() => controller.current && controller.current.abort()} disabled=${!busy}>Stop</button>
      <button type="button" onClick=${regenerate} disabled=${busy || !messages.length}>Regenerate</button>
    </form>
  </section>`;
}

// ---- adapters -------------------------------------------------------------------------------------------------

function Adapters({ onChanged, refreshKey }) {
  const [adapters, setAdapters] = useState([]);
  const [error, setError] = useState(null);
  const [notice, setNotice] = useState(null);
  const [name, setName] = useState("");
  const [file, setFile] = useState(null);
  const [over, setOver] = useState(false);
  const [busy, setBusy] = useState(false);
  const [description, setDescription] = useState("");
  const [examples, setExamples] = useState("");
  const [editing, setEditing] = useState(null); // {id, description, examples}
  const load = useCallback(async () => {
    try { setAdapters((await api("/v1/adapters")).data); setError(null); } catch (e) { setError(e.message); }
  }, []);
  useEffect(() => { load(); }, [refreshKey]);
  const upload = async (e) => {
    e.preventDefault();
    if (!file || !name) { setError("choose a name and a .zip or .tar.gz of a PEFT adapter folder"); return; }
    const form = new FormData();
    form.append("name", name);
    form.append("file", file);
    if (description) form.append("description", description);
    const lines = examples.split("\n").map((x) => x.trim()).filter(Boolean);
    if (lines.length) form.append("examples", JSON.stringify(lines));
    setBusy(true); setError(null); setNotice(null);
    try {
      const v = await api("/v1/adapters", { method: "POST", form });
      setNotice(`${v.id} v${v.version} published`);
      setName(""); setFile(null); setDescription(""); setExamples("");
      await load(); onChanged();
    } catch (err) { setError(err.message); }
    setBusy(false);
  };
  const remove = async (id) => {
    if (!confirm(`Delete adapter ${id} and all its versions?`)) return;
    try { await api(`/v1/adapters/${encodeURIComponent(id)}`, { method: "DELETE" }); await load(); onChanged(); }
    catch (err) { setError(err.message); }
  };
  const saveEdit = async (e) => {
    e.preventDefault();
    try {
      await api(`/v1/adapters/${encodeURIComponent(editing.id)}`, { method: "PATCH", body: { metadata: {
        description: editing.description || null,
        examples: editing.examples.split("\n").map((x) => x.trim()).filter(Boolean) } } });
      setEditing(null); setNotice("metadata saved"); await load(); onChanged();
    } catch (err) { setError(err.message); }
  };
  const drop = (e) => {
    e.preventDefault(); setOver(false);
    const f = e.dataTransfer.files[0];
    if (f) { setFile(f); if (!name) setName(f.name.replace(/\.(zip|tar\.gz|tgz)$/, "").replace(/[^A-Za-z0-9._-]/g, "-")); }
  };
  return html`<section class="panel" aria-labelledby="adapters-title">
    <h2 id="adapters-title">Adapters</h2>
    <table>
      <thead><tr><th>Name</th><th>Description</th><th>Version</th><th>Rank</th><th>Targets</th><th>Size</th><th>Where</th>
        <th>Created</th><th><span class="visually-hidden">Actions</span></th></tr></thead>
      <tbody>${adapters.map((a) => html`<tr data-adapter=${a.id}>
        <td>${a.id}</td><td>${(a.metadata || {}).description || ""}
          ${((a.metadata || {}).examples || []).length ? html`<div class="muted">${a.metadata.examples.length} example prompt(s)</div>` : null}</td>
        <td>v${a.version}</td><td>${a.rank}${a.type === "mixlora" ? " · MixLoRA" : ""}</td><td>${a.target_modules.join(", ")}</td>
        <td>${fmtBytes(a.bytes)}</td><td>${a.resident || "–"}</td><td>${fmtTime(a.created)}</td>
        <td><button type="button" onClick=${() => setEditing({ id: a.id, description: (a.metadata || {}).description || "",
              examples: ((a.metadata || {}).examples || []).join("\n") })} aria-label=${`Edit ${a.id}`}>Edit</button>
          <button type="button" class="danger" onClick=${() => remove(a.id)} aria-label=${`Delete ${a.id}`}>Delete</button></td>
      </tr>`)}</tbody>
    </table>
    ${editing ? html`<form class="panel" onSubmit=${saveEdit} aria-label=${`Edit ${editing.id}`}>
      <h2>Edit ${editing.id}</h2>
      <label class="wide" for="edit-description">Description<input id="edit-description" value=${editing.description}
        onInput=${(e) => setEditing({ ...editing, description: e.target.value })} /></label>
      <label class="wide" for="edit-examples">Example prompts (one per line)<textarea id="edit-examples" value=${editing.examples}
        onInput=${(e) => setEditing({ ...editing, examples: e.target.value })}></textarea></label>
      <div class="row"><button class="primary" type="submit">Save</button>
        <button type="button" onClick=${() => setEditing(null)}>Cancel</button></div>
    </form>` : null}
    ${adapters.length ? null : html`<p class="muted">No adapters yet.</p>`}
    <h2>Upload an adapter</h2>
    <form onSubmit=${upload}>
      <div class=${`drop${over ? " over" : ""}`} onDragOver=${(e) => { e.preventDefault(); setOver(true); }}
        onDragLeave=${() => setOver(false)} onDrop=${drop}>
        Drop a .zip or .tar.gz of a PEFT folder here, or
        <label for="adapter-file" class="inline">choose a file
          <input id="adapter-file" type="file" accept=".zip,.tar.gz,.tgz"
            onChange=${(e) => { const f = e.target.files[0]; setFile(f || null);
              if (f && !name) setName(f.name.replace(/\.(zip|tar\.gz|tgz)$/, "").replace(/[^A-Za-z0-9._-]/g, "-")); }} /></label>
        ${file ? html`<div>${file.name} (${fmtBytes(file.size)})</div>` : null}
      </div>
      <div class="row">
        <label for="adapter-name">Name<input id="adapter-name" value=${name} onInput=${(e) => setName(e.target.value)} /></label>
        <label class="grow" for="adapter-description">Description (optional)<input id="adapter-description"
          value=${description} onInput=${(e) => setDescription(e.target.value)} /></label>
        <button class="primary" type="submit" disabled=${busy}>Upload</button>
      </div>
      <label class="wide" for="adapter-examples">Example prompts (optional, one per line)<textarea id="adapter-examples"
        value=${examples} onInput=${(e) => setExamples(e.target.value)}></textarea></label>
    </form>
    ${error ? html`<div class="error" role="alert">${error}</div>` : null}
    ${notice ? html`<div class="notice" role="status">${notice}</div>` : null}
  </section>`;
}

// ---- fine-tuning ----------------------------------------------------------------------------------------------

function LossChart({ series }) {
  const box = useRef(null);
  const plot = useRef(null);
  useEffect(() => {
    if (!box.current || !window.uPlot) return;
    if (plot.current) { plot.current.destroy(); plot.current = null; }
    if (!series.length) return;
    const steps = [...new Set(series.flatMap((s) => s.points.map((p) => p[0])))].sort((a, b) => a - b);
    const data = [steps, ...series.map((s) => { const m = new Map(s.points); return steps.map((x) => m.has(x) ? m.get(x) : null); })];
    const palette = ["#2f5bd3", "#d3482f", "#1d7a46", "#9a5b00", "#7a3fb3", "#0f7c8c"];
    plot.current = new window.uPlot({
      width: Math.max(320, box.current.clientWidth), height: 260, scales: { x: { time: false } },
      axes: [{ label: "step" }, { label: "loss" }],
      series: [{ label: "step" }, ...series.map((s, i) => ({ label: s.label, stroke: palette[i % palette.length],
        dash: s.valid ? [6, 4] : undefined, spanGaps: true, points: { show: s.points.length < 50 } }))],
    }, data, box.current);
    return () => { if (plot.current) { plot.current.destroy(); plot.current = null; } };
  }, [JSON.stringify(series)]);
  return html`<div class="chart" ref=${box} role="img"
    aria-label=${series.length ? `Loss per step: ${series.map((s) => `${s.label} ${s.points.length} points`).join(", ")}`
                               : "Loss chart: select a job"}
    data-points=${series.reduce((n, s) => n + s.points.length, 0)}></div>`;
}

function FineTuning({ onCompare, onChanged, refreshKey }) {
  const [jobs, setJobs] = useState([]);
  const [files, setFiles] = useState([]);
  const [selected, setSelected] = useState([]);
  const [focus, setFocus] = useState(null);
  const [metrics, setMetrics] = useState({});
  const [events, setEvents] = useState([]);
  const [checkpoints, setCheckpoints] = useState([]);
  const [error, setError] = useState(null);
  const [fileError, setFileError] = useState(null);
  const [notice, setNotice] = useState(null);
  const [form, setForm] = useState({ model: "", training_file: "", suffix: "", n_epochs: 3, batch_size: 4,
    learning_rate_multiplier: 1, r: 8, alpha: 16, target_modules: "q_proj,v_proj", validation_fraction: 0.1 });
  const [base, setBase] = useState([]);
  const known = useRef({});

  const refresh = useCallback(async () => {
    try {
      const [j, f] = await Promise.all([api("/v1/fine_tuning/jobs?limit=20"), api("/v1/files?purpose=fine-tune")]);
      for (const job of j.data) {
        const before = known.current[job.id];
        if (before && before !== job.status && job.status === "succeeded") onChanged();
        known.current[job.id] = job.status;
      }
      setJobs(j.data); setFiles(f.data); setError(null);
    } catch (e) { setError(e.message); }
  }, []);
  useEffect(() => {
    const t = setInterval(refresh, 2000);
    return () => clearInterval(t);
  }, []);
  useEffect(() => { // again when the key changes
    refresh();
    api("/v1/models").then((m) => { const ids = m.data.filter((x) => !x.parent).map((x) => x.id); setBase(ids);
      setForm((f) => ({ ...f, model: f.model || ids[0] || "" })); }).catch(() => {});
  }, [refreshKey]);
  // losses of the selected jobs (and events/checkpoints of the focused one), every 2 s while any is active
  useEffect(() => {
    let live = true;
    const load = async () => {
      const out = {};
      for (const id of selected) {
        const all = await listAll(`/v1/fine_tuning/jobs/${id}/events`).catch(() => []);
        const rows = all.filter((e) => e.type === "metrics" && e.data).map((e) => e.data).sort((a, b) => a.step - b.step);
        out[id] = rows;
      }
      if (focus) {
        const [ev, ck] = await Promise.all([api(`/v1/fine_tuning/jobs/${focus}/events?limit=50`).catch(() => ({ data: [] })),
          api(`/v1/fine_tuning/jobs/${focus}/checkpoints?limit=20`).catch(() => ({ data: [] }))]);
        if (live) { setEvents(ev.data); setCheckpoints(ck.data); }
      }
      if (live) setMetrics(out);
    };
    load();
    const t = setInterval(load, 2000);
    return () => { live = false; clearInterval(t); };
  }, [selected.join(","), focus]);

  const uploadFile = async (e) => {
    const f = e.target.files[0];
    if (!f) return;
    const data = new FormData();
    data.append("purpose", "fine-tune");
    data.append("file", f);
    setFileError(null); setNotice(null);
    try {
      const uploaded = await api("/v1/files", { method: "POST", form: data });
      setNotice(`${uploaded.filename} uploaded as ${uploaded.id}`);
      setForm((x) => ({ ...x, training_file: uploaded.id }));
      await refresh();
    } catch (err) { setFileError(err.message); }
    e.target.value = "";
  };
  const create = async (e) => {
    e.preventDefault();
    setError(null); setNotice(null);
    try {
      const job = await api("/v1/fine_tuning/jobs", { method: "POST", body: {
        model: form.model, training_file: form.training_file, suffix: form.suffix || undefined,
        method: { type: "supervised", supervised: { hyperparameters: { n_epochs: Number(form.n_epochs),
          batch_size: Number(form.batch_size), learning_rate_multiplier: Number(form.learning_rate_multiplier) } } },
        lora: { r: Number(form.r), alpha: Number(form.alpha), validation_fraction: Number(form.validation_fraction),
                target_modules: form.target_modules.split(",").map((s) => s.trim()).filter(Boolean) } } });
      setNotice(`job ${job.id} created`);
      setSelected((s) => [...new Set([...s, job.id])]); setFocus(job.id);
      await refresh();
    } catch (err) { setError(err.message); }
  };
  const cancel = async (id) => {
    try { await api(`/v1/fine_tuning/jobs/${id}/cancel`, { method: "POST" }); await refresh(); }
    catch (err) { setError(err.message); }
  };
  const toggle = (id) => setSelected((s) => s.includes(id) ? s.filter((x) => x !== id) : [...s, id]);
  const series = selected.flatMap((id) => {
    const rows = metrics[id] || [];
    const job = jobs.find((j) => j.id === id);
    const label = (job && job.fine_tuned_model) || id;
    const train = rows.filter((r) => typeof r.train_loss === "number").map((r) => [r.step, r.train_loss]);
    const valid = rows.filter((r) => typeof r.valid_loss === "number").map((r) => [r.step, r.valid_loss]);
    return [...(train.length ? [{ label: `${label} train`, points: train }] : []),
            ...(valid.length ? [{ label: `${label} valid`, points: valid, valid: true }] : [])];
  });
  const set = (k) => (e) => setForm({ ...form, [k]: e.target.value });
  return html`<section class="panel" aria-labelledby="ft-title">
    <h2 id="ft-title">Fine-tuning</h2>
    <div class="row">
      <label for="training-upload">Upload a training file (.jsonl: chat, prompt/completion or preference rows)
        <input id="training-upload" type="file" accept=".jsonl,.json" onChange=${uploadFile} /></label>
    </div>
    ${fileError ? html`<div class="error" role="alert" data-error="file">${fileError}</div>` : null}
    <form onSubmit=${create}>
      <div class="row">
        <label for="ft-model">Base model<select id="ft-model" value=${form.model} onChange=${set("model")}>
          ${base.map((m) => html`<option value=${m}>${m}</option>`)}</select></label>
        <label for="ft-file">Training file<select id="ft-file" value=${form.training_file} onChange=${set("training_file")}>
          <option value="">choose…</option>
          ${files.map((f) => html`<option value=${f.id}>${f.filename} (${f.id})</option>`)}</select></label>
        <label for="ft-suffix">Suffix<input id="ft-suffix" value=${form.suffix} onInput=${set("suffix")} /></label>
        <label for="ft-epochs">Epochs<input id="ft-epochs" type="number" min="1" value=${form.n_epochs} onInput=${set("n_epochs")} /></label>
        <label for="ft-batch">Batch size<input id="ft-batch" type="number" min="1" value=${form.batch_size} onInput=${set("batch_size")} /></label>
        <label for="ft-lr">Learning rate ×<input id="ft-lr" type="number" step="0.1" min="0" value=${form.learning_rate_multiplier}
          onInput=${set("learning_rate_multiplier")} /></label>
        <label for="ft-r">LoRA rank<input id="ft-r" type="number" min="1" value=${form.r} onInput=${set("r")} /></label>
        <label for="ft-alpha">LoRA alpha<input id="ft-alpha" type="number" min="1" value=${form.alpha} onInput=${set("alpha")} /></label>
        <label for="ft-targets">Target modules<input id="ft-targets" value=${form.target_modules} onInput=${set("target_modules")} /></label>
        <label for="ft-valid">Validation share<input id="ft-valid" type="number" step="0.05" min="0" max="0.5"
          value=${form.validation_fraction} onInput=${set("validation_fraction")} /></label>
        <button class="primary" type="submit" disabled=${!form.training_file || !form.model}>Create job</button>
      </div>
    </form>
    ${error ? html`<div class="error" role="alert">${error}</div>` : null}
    ${notice ? html`<div class="notice" role="status">${notice}</div>` : null}
    <table>
      <thead><tr><th>Chart</th><th>Job</th><th>Status</th><th>Model</th><th>Created</th><th><span class="visually-hidden">Actions</span></th></tr></thead>
      <tbody>${jobs.map((j) => html`<tr data-job=${j.id}>
        <td><input type="checkbox" checked=${selected.includes(j.id)} onChange=${() => toggle(j.id)}
          aria-label=${`Show ${j.id} in the chart`} /></td>
        <td><button type="button" onClick=${() => setFocus(j.id)} aria-pressed=${focus === j.id}>${j.id}</button></td>
        <td><span class=${`badge ${j.status}`} data-status=${j.status}>${j.status}</span></td>
        <td>${j.fine_tuned_model || j.model}</td><td>${fmtTime(j.created_at)}</td>
        <td>${["queued", "running", "validating_files", "paused"].includes(j.status)
          ? html`<button type="button" class="danger" onClick=${() => cancel(j.id)}>Cancel</button>` : null}
          ${j.status === "succeeded" && j.fine_tuned_model ? html`<button type="button"
            onClick=${() => onCompare([j.model, j.fine_tuned_model])}>Compare with base</button>` : null}</td>
      </tr>`)}</tbody>
    </table>
    <h2>Loss</h2>
    <${LossChart} series=${series} />
    ${focus ? html`<h2>Events of ${focus}</h2>
      <div class="events" aria-label="Events">${events.map((e) => html`<div><span class="muted">${fmtTime(e.created_at)}</span> ${e.message}</div>`)}</div>
      <h2>Checkpoints</h2>
      <ul>${checkpoints.map((c) => html`<li>step ${c.step_number}: ${c.fine_tuned_model_checkpoint}</li>`)}</ul>` : null}
  </section>`;
}

// ---- the app --------------------------------------------------------------------------------------------------

function App() {
  const initial = (location.hash || "#compare").slice(1);
  const [tab, setTab] = useState(TABS.some(([id]) => id === initial) ? initial : "compare");
  const [key, setKey] = useState(localStorage.getItem(KEY_STORAGE) || "");
  const [refresh, setRefresh] = useState(0);
  const [preset, setPreset] = useState(null);
  const [models, modelsError, examples] = useModels(`${refresh}:${key}`);
  const changed = () => setRefresh((n) => n + 1);
  const go = (id) => { setTab(id); history.replaceState(null, "", `#${id}`); };
  const saveKey = (e) => {
    e.preventDefault();
    if (key) localStorage.setItem(KEY_STORAGE, key); else localStorage.removeItem(KEY_STORAGE);
    changed();
  };
  const onTabKey = (e) => {
    const i = TABS.findIndex(([id]) => id === tab);
    const j = e.key === "ArrowRight" ? (i + 1) % TABS.length : e.key === "ArrowLeft" ? (i + TABS.length - 1) % TABS.length : -1;
    if (j >= 0) { go(TABS[j][0]); document.getElementById(`tab-${TABS[j][0]}`).focus(); }
  };
  return html`<header>
      <h1>loraplex</h1>
      <nav role="tablist" aria-label="Views" onKeyDown=${onTabKey}>
        ${TABS.map(([id, label]) => html`<button role="tab" id=${`tab-${id}`} aria-selected=${tab === id}
          aria-controls=${`view-${id}`} tabindex=${tab === id ? 0 : -1} onClick=${() => go(id)}>${label}</button>`)}
      </nav>
      <form class="key" onSubmit=${saveKey}>
        <label for="api-key" class="inline">API key<input id="api-key" type="password" autocomplete="off" value=${key}
          onInput=${(e) => setKey(e.target.value)} /></label>
        <button type="submit">Save</button>
      </form>
    </header>
    <${StatusStrip} />
    <main>
      ${modelsError ? html`<div class="error" role="alert">${modelsError}</div>` : null}
      <div role="tabpanel" id="view-compare" aria-labelledby="tab-compare" hidden=${tab !== "compare"}>
        <${Compare} models=${models} preset=${preset} examples=${examples} /></div>
      <div role="tabpanel" id="view-chat" aria-labelledby="tab-chat" hidden=${tab !== "chat"}>
        <${Chat} models=${models} /></div>
      <div role="tabpanel" id="view-adapters" aria-labelledby="tab-adapters" hidden=${tab !== "adapters"}>
        <${Adapters} refreshKey=${key + ":" + refresh} onChanged=${changed} /></div>
      <div role="tabpanel" id="view-fine-tuning" aria-labelledby="tab-fine-tuning" hidden=${tab !== "fine-tuning"}>
        <${FineTuning} refreshKey=${key + ":" + refresh} onChanged=${changed} onCompare=${(pair) => { setPreset(pair); go("compare"); }} /></div>
    </main>`;
}

const root = document.getElementById("app");
root.textContent = ""; // the "Loading…" placeholder
render(html`<${App} />`, root);
