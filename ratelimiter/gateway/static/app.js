// The admin UI: plain DOM, no dependencies. Every value from the API is set as text, never
// parsed as HTML. The master key lives in sessionStorage: gone when the tab closes.
"use strict";

const KEY_STORE = "ratelimiter-master-key";
const DURATIONS = ["", "daily", "weekly", "monthly", "yearly", "1d", "7d", "30d"];

// -- DOM ------------------------------------------------------------------------------

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else if (name === "text") node.textContent = value;
    else node.setAttribute(name, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function svg(tag, attrs = {}, ...children) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, value);
  for (const child of children.flat()) {
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

const money = (v) => (v === null || v === undefined ? "—" : "$" + Number(v).toFixed(v < 1 ? 6 : 2));
const plain = (v) => (v === null || v === undefined || v === "" ? "—" : String(v));
const when = (v) => (v ? new Date(v).toLocaleString() : "—");
// The API stores durations in their short form; show the names people type.
const NAMED = { "1d": "daily", "1w": "weekly", "1mo": "monthly", "1y": "yearly" };
const durationName = (v) => (v ? NAMED[v] || v : v);
const plural = (n, word) => `${n} ${word}${n === 1 ? "" : "s"}`;

// A key as people recognise it: LiteLLM's key_name is the preview "sk-...abcd". Keys created
// before previews existed have none; their sha256 is shown marked as one, never as if it were
// the start of the key.
function keyPreview(info, hash) {
  if (info && info.key_name) return el("code", { class: "preview", text: info.key_name });
  return el("span", { class: "hash", title: "sha256 of the key (created before key previews)" },
    "sha256 ", el("code", { text: String(hash || (info && info.token_id) || "").slice(0, 8) + "…" }));
}

// -- the API --------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, message, param) {
    super(message);
    this.status = status;
    this.param = param;
  }
}

async function api(method, path, body) {
  const headers = { Authorization: "Bearer " + sessionStorage.getItem(KEY_STORE) };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let response;
  try {
    response = await fetch(path, {
      method, headers, body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch (err) {
    throw new ApiError(0, "The sidecar cannot be reached: " + err.message, null);
  }
  const data = await response.json().catch(() => null);
  if (!response.ok) {
    const error = (data && data.error) || {};
    if (response.status === 401 && path !== "/key/list") signOut("Signed out: " + error.message);
    throw new ApiError(response.status, error.message || response.statusText, error.param);
  }
  return data;
}

// -- tables, dialogs ---------------------------------------------------------------------

// Columns: {title, value(row), num, cls}; cls "id" lets long ids break anywhere. Tables never
// scroll sideways: cells wrap, and on a phone the rows of a table of more than three columns
// stack into label/value lines (style.css), the label coming from data-label.
function table(caption, columns, rows) {
  if (!rows.length) return el("p", { class: "empty", text: "None yet." });
  const cls = (c) => [c.num ? "num" : null, c.cls].filter(Boolean).join(" ") || null;
  return el("div", { class: "table-wrap" },
    el("table", { class: columns.length > 3 ? "stack" : null },
      el("caption", { class: "sr-only", text: caption }),
      el("thead", {}, el("tr", {}, columns.map((c) =>
        el("th", { scope: "col", class: cls(c), text: c.title })))),
      el("tbody", {}, rows.map((row) => el("tr", {}, columns.map((c) => {
        const value = c.value(row);
        return el("td", { class: cls(c), "data-label": c.title || null },
          value instanceof Node ? value : plain(value));
      }))))));
}

// The action buttons of a row; they wrap onto a second line rather than leave the card.
const actions = (...buttons) => el("div", { class: "actions" }, buttons);
const ACTIONS = { title: "", cls: "actions-cell" };

const dialog = () => document.getElementById("dialog");

function closeDialog() {
  const d = dialog();
  if (d.open) d.close();
}

// A form in the modal dialog. fields: {name, label, type, required, options, hint, value}.
// submit(values) may throw an ApiError: its message is shown beside the field it names.
function formDialog(title, fields, submit, submitLabel = "Save") {
  const d = dialog();
  d.replaceChildren();
  const general = el("p", { class: "error", role: "alert", id: "form-error" });
  const inputs = {};
  const errors = {};
  const rows = fields.map((f) => {
    const id = "field-" + f.name;
    errors[f.name] = el("p", { class: "error", id: id + "-error", role: "alert" });
    let input;
    if (f.readonly) {
      // Shown as text: an input that cannot be changed looked editable and took the focus.
      return el("div", { class: "field" },
        el("p", { class: "label", id: id + "-label", text: f.label }),
        el("p", { class: "readonly", id, "aria-labelledby": id + "-label", text: plain(f.value) }));
    }
    if (f.options) {
      input = el("select", { id, name: f.name },
        f.options.map((o) => el("option", { value: o, selected: String(f.value ?? "") === o },
          o === "" ? "(none)" : o)));
    } else {
      input = el("input", {
        id, name: f.name, type: f.type === "number" ? "number" : "text",
        step: f.type === "number" ? "any" : null, min: f.type === "number" ? "0" : null,
        required: f.required, value: f.value ?? "", readonly: f.readonly,
        "aria-describedby": id + "-error" + (f.hint ? " " + id + "-hint" : ""),
      });
    }
    inputs[f.name] = input;
    return el("div", {},
      el("label", { for: id }, f.label + (f.required ? " (required)" : "")),
      input,
      f.hint ? el("p", { class: "hint", id: id + "-hint", text: f.hint }) : null,
      errors[f.name]);
  });
  const form = el("form", { method: "dialog" },
    el("h2", { id: "dialog-title", text: title }),
    general, rows,
    el("div", { class: "buttons" },
      el("button", { type: "button", class: "quiet", onclick: closeDialog }, "Cancel"),
      el("button", { type: "submit" }, submitLabel)));
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    for (const name in inputs) {
      errors[name].textContent = "";
      inputs[name].removeAttribute("aria-invalid");
    }
    general.textContent = "";
    const values = {};
    for (const f of fields) {
      if (f.readonly) { values[f.name] = f.value; continue; }
      const raw = inputs[f.name].value.trim();
      // emptied in an edit: none any more (left empty on create, it is not sent)
      if (raw === "" && f.clearable && f.value && f.value.length) values[f.name] = [];
      if (raw === "") continue;
      values[f.name] = f.type === "number" ? Number(raw) : f.type === "list"
        ? raw.split(",").map((s) => s.trim()).filter(Boolean) : f.type === "boolean"
          ? raw === "true" : raw;
    }
    try {
      await submit(values);
      if (d.contains(form)) closeDialog(); // unless submit put something else there
    } catch (err) {
      const target = err.param && inputs[err.param] && errors[err.param];
      if (target) {
        target.textContent = err.message;
        inputs[err.param].setAttribute("aria-invalid", "true");
        inputs[err.param].focus();
      } else {
        general.textContent = err.message;
      }
    }
  });
  d.append(form);
  d.showModal();
}

function messageDialog(title, ...content) {
  const d = dialog();
  d.replaceChildren(el("div", { class: "body" },
    el("h2", { id: "dialog-title", text: title }), content,
    el("div", { class: "buttons" },
      el("button", { type: "button", onclick: closeDialog, autofocus: true }, "Done"))));
  d.showModal();
}

function confirmThen(question, action) {
  return async () => {
    if (window.confirm(question)) {
      try { await action(); } catch (err) { messageDialog("Not done", el("p", { text: err.message })); }
      render();
    }
  };
}

function button(label, onclick, cls = "quiet small") {
  return el("button", { type: "button", class: cls, onclick }, label);
}

function header(title, ...buttons) {
  return el("div", { class: "bar" }, el("h1", { text: title }), el("div", {}, buttons));
}

// -- shadow mode: limits counted and reported, not enforced ------------------------------

const SHADOW_LIMIT_NAMES = ["rpm_limit", "tpm_limit", "input_tpm_limit", "output_tpm_limit",
  "max_parallel_requests", "max_budget", "model_max_budget", "model_rpm_limit", "model_tpm_limit"];
const SHADOW_FIELDS = [
  { name: "shadow_mode", label: "Shadow mode", type: "boolean", options: ["", "true", "false"],
    hint: "true: every limit here is counted and its would-be 429s reported, none enforced." },
  { name: "shadow_limits", label: "Shadow limits", type: "list", clearable: true,
    hint: "Only these, comma-separated: " + SHADOW_LIMIT_NAMES.join(", ") },
];

// Which of an entity's limits are in shadow, as a badge (nothing when all are enforced).
function shadowBadge(entity) {
  const named = entity.shadow_limits || [];
  if (!entity.shadow_mode && !named.length) return el("span", { class: "muted", text: "enforced" });
  return el("span", { class: "badge shadow", title: "counted and reported, not enforced",
    text: "shadow: " + (entity.shadow_mode ? "all limits" : named.join(", ")) });
}
const SHADOW_COLUMN = { title: "Shadow", value: shadowBadge };

// The badge, and today's would-be 429s of the entity's shadow limits (from /ui/api/shadow,
// summed over sidecars), also once they are enforced again.
function shadowColumn(kind, entityOf, idOf, shadow) {
  return { title: "Shadow", value: (row) => {
    if (!entityOf(row)) return null; // nothing here has limits of its own
    const counts = (shadow.entities || {})[`${kind}:${idOf(row)}`] || {};
    const total = Object.values(counts).reduce((sum, n) => sum + n, 0);
    return el("div", {}, shadowBadge(entityOf(row)), total ? el("div", { class: "muted shadow-count",
      title: Object.entries(counts).map(([limit, n]) => `${limit}: ${n}`).join(", "),
      text: `${plural(total, "would-be 429")} today` }) : null);
  } };
}
const shadowToday = () => api("GET", "/ui/api/shadow");

// -- pages -------------------------------------------------------------------------------

const LIMIT_FIELDS = [
  { name: "max_budget", label: "Max Budget ($)", type: "number" },
  { name: "soft_budget", label: "Soft Budget ($)", type: "number",
    hint: "An alert when spend crosses it; requests still pass." },
  { name: "tpm_limit", label: "Max Tokens per Minute", type: "number" },
  { name: "rpm_limit", label: "Max Requests per Minute", type: "number" },
  { name: "max_parallel_requests", label: "Max Parallel Requests", type: "number" },
  { name: "budget_duration", label: "Budget Duration", options: DURATIONS,
    hint: "When spend resets: daily at midnight, monthly on the 1st…" },
  ...SHADOW_FIELDS,
];

function withValues(fields, values) {
  return fields.map((f) => ({
    ...f,
    value: !values ? undefined : f.name === "budget_duration"
      ? durationName(values[f.name]) : values[f.name],
  }));
}

async function budgetsPage() {
  const budgets = await api("GET", "/ui/api/budgets");
  const edit = (b) => formDialog("Edit budget " + b.budget_id,
    withValues([{ name: "budget_id", label: "Budget ID", readonly: true }, ...LIMIT_FIELDS], b),
    async (values) => { await api("POST", "/budget/update", values); render(); });
  return [
    header("Budgets", el("button", { type: "button", id: "create-budget", onclick: () =>
      formDialog("Create Budget", [{ name: "budget_id", label: "Budget ID", required: true },
        ...LIMIT_FIELDS], async (values) => { await api("POST", "/budget/new", values); render(); },
      "Create Budget") }, "+ Create Budget")),
    el("section", { class: "card" }, table("Budgets", [
      { cls: "id", title: "Budget ID", value: (b) => b.budget_id },
      { title: "Max budget", num: true, value: (b) => money(b.max_budget) },
      { title: "Soft budget", num: true, value: (b) => money(b.soft_budget) },
      { title: "RPM / TPM / parallel", value: (b) =>
        [b.rpm_limit, b.tpm_limit, b.max_parallel_requests].map(plain).join(" / ") },
      { title: "Duration", value: (b) => durationName(b.budget_duration) },
      SHADOW_COLUMN,
      { title: "Next reset", value: (b) => when(b.budget_reset_at) },
      { title: "Used by", value: (b) => `${plural(b.keys, "key")}, ${plural(b.customers, "customer")}` },
      { ...ACTIONS, value: (b) => actions(
        button("Edit", () => edit(b)),
        button("Delete", confirmThen(`Delete budget ${b.budget_id}?`,
          () => api("POST", "/budget/delete", { id: b.budget_id })), "danger small")) },
    ], budgets)),
  ];
}

const KEY_FIELDS = [
  { name: "key_alias", label: "Key alias" },
  { name: "user_id", label: "User ID" },
  { name: "team_id", label: "Team ID" },
  { name: "models", label: "Models", type: "list", hint: "Comma-separated; empty means all." },
];

// /key/list answers a page at a time, as LiteLLM's does.
async function allKeys() {
  const keys = [];
  for (let page = 1; ; page++) {
    const list = await api("GET", "/key/list?size=100&page=" + page);
    keys.push(...list.keys);
    if (page >= list.total_pages) return { keys };
  }
}

async function keysPage() {
  const [list, budgets, shadow] = await Promise.all([allKeys(), api("GET", "/budget/list"),
    shadowToday()]);
  // /key/list gives the keys' hashes (or, asked for full objects, the keys themselves).
  const ids = list.keys.map((k) => (typeof k === "string" ? k : k.token || k.token_id));
  const infos = await Promise.all(ids.map((k) => api("GET", "/key/info?key=" + encodeURIComponent(k))));
  const budgetField = { name: "budget_id", label: "Budget", options: ["", ...budgets.map((b) => b.budget_id)] };
  const create = () => formDialog("Create Key", [...KEY_FIELDS, budgetField, ...LIMIT_FIELDS],
    async (values) => {
      const created = await api("POST", "/key/generate", values);
      await render();
      showKeyOnce(created.key);
    }, "Create Key");
  // Lifetime spend, whether or not the key has a budget, then each budget window's share.
  const spend = (info) => el("div", {},
    el("div", { text: money(info.spend ?? 0) }),
    (info.budget_windows || []).map((w) => el("div", { class: "muted",
      text: `${money(w.spend)} of ${money(w.max_budget)} / ${durationName(w.budget_duration)}` })));
  const name = (k) => k.info.key_alias || k.info.key_name || "sha256 " + k.key.slice(0, 8) + "…";
  return [
    header("Keys", el("button", { type: "button", id: "create-key", onclick: create }, "+ Create Key")),
    el("section", { class: "card" }, table("Keys", [
      // The alias people gave it over the preview that tells keys apart.
      { cls: "id", title: "Key", value: (k) => el("div", {},
        k.info.key_alias ? el("span", { class: "sub alias", text: k.info.key_alias }) : null,
        el("span", { class: "sub" }, keyPreview(k.info, k.key))) },
      { cls: "id", title: "User", value: (k) => k.info.user_id },
      { cls: "id", title: "Team", value: (k) => k.info.team_id },
      { cls: "id", title: "Budget", value: (k) => k.info.budget_id },
      { title: "RPM / TPM / parallel", value: (k) =>
        [k.info.rpm_limit, k.info.tpm_limit, k.info.max_parallel_requests].map(plain).join(" / ") },
      { title: "Spend", value: (k) => spend(k.info) },
      shadowColumn("key", (k) => k.info, (k) => k.info.key_id || k.key, shadow),
      { title: "State", value: (k) => el("span", { class: "badge " + (k.info.blocked ? "bad" : "good"),
        text: k.info.blocked ? "blocked" : "active" }) },
      { ...ACTIONS, value: (k) => actions(
        button("Edit", () => formDialog("Edit key " + name(k),
          withValues([{ name: "key_alias", label: "Key alias" }, budgetField, ...LIMIT_FIELDS], k.info),
          async (values) => { await api("POST", "/key/update", { key: k.key, ...values }); render(); })),
        button(k.info.blocked ? "Unblock" : "Block", confirmThen(
          `${k.info.blocked ? "Unblock" : "Block"} key ${name(k)}?`,
          () => api("POST", k.info.blocked ? "/key/unblock" : "/key/block", { key: k.key }))),
        button("Delete", confirmThen(`Delete key ${name(k)}? Its holders lose access at once.`,
          () => api("POST", "/key/delete", { keys: [k.key] })), "danger small")) },
    ], infos)),
  ];
}

function showKeyOnce(key) {
  const status = el("p", { class: "hint", role: "status" });
  const copy = el("button", { type: "button", id: "copy-key", onclick: async () => {
    try {
      await navigator.clipboard.writeText(key);
      status.textContent = "Copied.";
    } catch {
      window.getSelection().selectAllChildren(secret);
      status.textContent = "Selected: press Ctrl+C to copy.";
    }
  } }, "Copy");
  const secret = el("p", { class: "secret", id: "new-key", text: key });
  messageDialog("Your new key",
    el("p", { text: "This is the only time the key is shown. Copy it now." }), secret, copy, status);
}

async function usersPage() {
  const [users, shadow] = await Promise.all([api("GET", "/user/list"), shadowToday()]);
  return [
    header("Users", el("button", { type: "button", onclick: () => formDialog("Create User",
      [{ name: "user_id", label: "User ID", required: true }, { name: "user_email", label: "Email" },
        ...LIMIT_FIELDS], async (v) => { await api("POST", "/user/new", v); render(); }) },
    "+ Create User")),
    el("section", { class: "card" }, table("Users", [
      { cls: "id", title: "User ID", value: (u) => u.user_id },
      { cls: "id", title: "Email", value: (u) => u.user_email },
      { title: "Max budget", num: true, value: (u) => money(u.max_budget) },
      { title: "Spend", num: true, value: (u) => money(u.spend) },
      { title: "Duration", value: (u) => durationName(u.budget_duration) },
      { title: "RPM / TPM", value: (u) => `${plain(u.rpm_limit)} / ${plain(u.tpm_limit)}` },
      shadowColumn("user", (u) => u, (u) => u.user_id, shadow),
      { ...ACTIONS, value: (u) => actions(
        button("Edit", () => formDialog("Edit user " + u.user_id,
          withValues([{ name: "user_email", label: "Email" }, ...LIMIT_FIELDS], u),
          async (values) => { await api("POST", "/user/update", { user_id: u.user_id, ...values }); render(); })),
        button("Delete", confirmThen(`Delete user ${u.user_id}?`,
          () => api("POST", "/user/delete", { user_ids: [u.user_id] })), "danger small")) },
    ], users)),
  ];
}

async function teamsPage() {
  const [teams, shadow] = await Promise.all([api("GET", "/team/list"), shadowToday()]);
  const addMember = (t) => formDialog("Add a member to " + t.team_id, [
    { name: "user_id", label: "User ID", required: true },
    { name: "role", label: "Role", options: ["user", "admin"] },
    { name: "max_budget_in_team", label: "Max budget in team ($)", type: "number" },
  ], async (v) => {
    const body = { team_id: t.team_id, member: { user_id: v.user_id, role: v.role || "user" } };
    if (v.max_budget_in_team !== undefined) body.max_budget_in_team = v.max_budget_in_team;
    try {
      await api("POST", "/team/member_add", body);
    } catch (err) {
      if (err.param === "member") err.param = "user_id";
      throw err;
    }
    render();
  }, "Add member");
  return [
    header("Teams", el("button", { type: "button", onclick: () => formDialog("Create Team",
      [{ name: "team_id", label: "Team ID", required: true }, { name: "team_alias", label: "Alias" },
        ...LIMIT_FIELDS], async (v) => { await api("POST", "/team/new", v); render(); }) },
    "+ Create Team")),
    el("section", { class: "card" }, table("Teams", [
      { cls: "id", title: "Team ID", value: (t) => t.team_id },
      { title: "Alias", value: (t) => t.team_alias },
      { title: "Max budget", num: true, value: (t) => money(t.max_budget) },
      { title: "Spend", num: true, value: (t) => money(t.spend) },
      shadowColumn("team", (t) => t, (t) => t.team_id, shadow),
      { cls: "id", title: "Members", value: (t) => el("div", {}, (t.members || []).map((m) =>
        el("div", {}, `${m.user_id} (${m.role || "user"}) `,
          button("Remove", confirmThen(`Remove ${m.user_id} from ${t.team_id}?`,
            () => api("POST", "/team/member_delete", { team_id: t.team_id, user_id: m.user_id })),
          "danger small")))) },
      { ...ACTIONS, value: (t) => actions(
        button("Edit", () => formDialog("Edit team " + t.team_id,
          withValues([{ name: "team_alias", label: "Alias" }, ...LIMIT_FIELDS], t),
          async (values) => { await api("POST", "/team/update", { team_id: t.team_id, ...values }); render(); })),
        button("Add member", () => addMember(t)),
        button("Delete", confirmThen(`Delete team ${t.team_id}?`,
          () => api("POST", "/team/delete", { team_ids: [t.team_id] })), "danger small")) },
    ], teams)),
  ];
}

async function customersPage() {
  const [customers, budgets, shadow] = await Promise.all([api("GET", "/customer/list"),
    api("GET", "/budget/list"), shadowToday()]);
  const options = ["", ...budgets.map((b) => b.budget_id)];
  const assign = (c) => formDialog("Budget of customer " + c.user_id,
    [{ name: "budget_id", label: "Budget", options, value: c.budget_id }],
    async (v) => { await api("POST", "/customer/update", { user_id: c.user_id, ...v }); render(); });
  return [
    header("Customers", el("button", { type: "button", onclick: () => formDialog("Create Customer", [
      { name: "user_id", label: "Customer ID", required: true,
        hint: "The `user` field your clients send." },
      { name: "alias", label: "Alias" },
      { name: "budget_id", label: "Budget", options },
      { name: "max_budget", label: "Or its own max budget ($)", type: "number" },
      { name: "budget_duration", label: "Budget Duration", options: DURATIONS },
    ], async (v) => { await api("POST", "/customer/new", v); render(); }) }, "+ Create Customer")),
    el("section", { class: "card" }, table("Customers", [
      { cls: "id", title: "Customer", value: (c) => c.user_id },
      { title: "Alias", value: (c) => c.alias },
      { cls: "id", title: "Budget", value: (c) => c.budget_id || (c.max_budget != null ? money(c.max_budget) : null) },
      { title: "Spend", num: true, value: (c) => money(c.spend) },
      shadowColumn("end_user", (c) => c, (c) => c.user_id, shadow),
      { title: "State", value: (c) => el("span", { class: "badge " + (c.blocked ? "bad" : "good"),
        text: c.blocked ? "blocked" : "active" }) },
      { ...ACTIONS, value: (c) => actions(
        button("Assign budget", () => assign(c)),
        button(c.blocked ? "Unblock" : "Block", confirmThen(
          `${c.blocked ? "Unblock" : "Block"} customer ${c.user_id}?`,
          () => api("POST", c.blocked ? "/customer/unblock" : "/customer/block",
            { user_ids: [c.user_id] }))),
        button("Delete", confirmThen(`Delete customer ${c.user_id}?`,
          () => api("POST", "/customer/delete", { user_ids: [c.user_id] })), "danger small")) },
    ], customers)),
  ];
}

// Tags: a tag with a budget or limits is a scope every request carrying it meets; tags that
// requests carried without being one are listed too (labels), each with its recent spend.
const TAG_FIELDS = [{ name: "description", label: "Description" }, ...LIMIT_FIELDS];

function tagForm(title, tag, route, submitLabel) {
  const named = tag && tag.name
    ? [{ name: "name", label: "Tag", readonly: true, value: tag.name }]
    : [{ name: "name", label: "Tag", required: true,
      hint: "What clients send in x-litellm-tags or metadata.tags; no , { or }." }];
  formDialog(title, [...named, ...withValues(TAG_FIELDS, tag && tag.created_at ? tag : null)],
    async (values) => { await api("POST", route, values); render(); }, submitLabel);
}

async function tagsPage() {
  const [tags, shadow] = await Promise.all([api("GET", "/tag/list"), shadowToday()]);
  const period = (t) => (t.budget_windows && t.budget_windows.length ? t.budget_windows[0] : null);
  return [
    header("Tags", el("button", { type: "button", id: "create-tag", onclick: () =>
      tagForm("Create Tag", null, "/tag/new", "Create Tag") }, "+ Create Tag")),
    el("section", { class: "card" }, table("Tags", [
      { cls: "id", title: "Tag", value: (t) => t.name },
      { title: "Kind", value: (t) => el("span", { class: "badge " + (t.created_at ? "good" : ""),
        text: t.created_at ? "limits" : "label" }) },
      { title: "Max budget", num: true, value: (t) => money(t.max_budget) },
      { title: "Spend", num: true, value: (t) => money(t.spend) },
      { title: "This period", num: true, value: (t) => (period(t) ? money(period(t).spend) : "—") },
      { title: "Duration", value: (t) => durationName(t.budget_duration) },
      { title: "Next reset", value: (t) => when(t.budget_reset_at) },
      shadowColumn("tag", (t) => (t.created_at ? t : null), (t) => t.name, shadow),
      { title: "RPM / TPM / parallel", value: (t) =>
        [t.rpm_limit, t.tpm_limit, t.max_parallel_requests].map(plain).join(" / ") },
      { ...ACTIONS, value: (t) => (t.created_at ? actions(
        button("Edit", () => tagForm("Edit tag " + t.name, t, "/tag/update")),
        button("Delete", confirmThen(`Delete tag ${t.name}? Its requests keep their spend.`,
          () => api("POST", "/tag/delete", { name: t.name })), "danger small"))
        : actions(button("Set limits", () => tagForm("Limits of tag " + t.name, t, "/tag/new",
          "Create Tag")))) },
    ], tags)),
  ];
}

async function modelsPage() {
  const models = (await api("GET", "/model/info")).data;
  const price = (v) => (v == null ? "—" : "$" + (v * 1e6).toFixed(2) + " / M");
  return [
    header("Models"),
    el("p", { class: "muted", text: "From the sidecar's config.yaml (model_list)." }),
    el("section", { class: "card" }, table("Models", [
      { cls: "id", title: "Model", value: (m) => m.model_name },
      { cls: "id", title: "Deployment", value: (m) => m.litellm_params.model },
      { cls: "id", title: "API base", value: (m) => m.litellm_params.api_base },
      { title: "RPM / TPM", value: (m) => `${plain(m.litellm_params.rpm)} / ${plain(m.litellm_params.tpm)}` },
      { title: "Input", num: true, value: (m) => price(m.litellm_params.input_cost_per_token) },
      { title: "Output", num: true, value: (m) => price(m.litellm_params.output_cost_per_token) },
      { title: "Access groups", value: (m) => m.model_info.access_groups.join(", ") },
    ], models)),
    ...priorityShares(models),
  ];
}

// A card with each split deployment's priority shares (litellm_settings.priority_reservation):
// what each pool is held to once the deployment is past its saturation threshold.
function priorityShares(models) {
  const split = models.filter((m) => m.model_info.priority_reservation);
  if (!split.length) return [];
  const rows = split.flatMap((m) => m.model_info.priority_reservation.priorities.map((p) => ({
    model: m.model_name, id: m.model_info.id, ...p,
    saturation: m.model_info.priority_reservation.saturation_threshold,
  })));
  const percent = (v) => (v * 100).toFixed(v * 100 % 1 ? 1 : 0) + "%";
  return [el("section", { class: "card" }, el("h2", { text: "Priority reservation" }),
    el("p", { class: "muted", text: "Below its saturation threshold anyone may use a deployment's "
      + "free capacity; past it each priority is held to its share." }),
    table("Priority reservation", [
    { cls: "id", title: "Deployment", value: (r) => r.id },
    { cls: "id", title: "Priority", value: (r) => r.priority },
    { title: "Share", num: true, value: (r) => percent(r.share) },
    { title: "RPM / TPM held to", value: (r) => `${plain(r.rpm)} / ${plain(r.tpm)}` },
    { title: "Saturation", num: true, value: (r) => percent(r.saturation) },
  ], rows))];
}

// -- spend ---------------------------------------------------------------------------------

// Charts are drawn in CSS pixels at the size the layout gives them, and again whenever that
// changes: a fixed viewBox scaled to fit left most of a wide card empty and shrank the labels
// to 6 px on a phone. draw(width, height) returns the children; redraw() after new data.
function fitted(attrs, draw) {
  const node = svg("svg", attrs);
  let size = null;
  const paint = () => {
    if (!size) return;
    node.setAttribute("viewBox", `0 0 ${size.width} ${size.height}`);
    node.replaceChildren(...draw(size.width, size.height).filter(Boolean));
  };
  new ResizeObserver(([entry]) => {
    const { width, height } = entry.contentRect;
    if (width > 0 && height > 0) { size = { width, height }; paint(); }
  }).observe(node);
  return { node, redraw: paint };
}

const LABEL_PX = 12; // the smallest text on the page (style.css sets it for svg text)

function dailyChart(days) {
  const most = Math.max(...days.map((d) => d.spend), 1e-9);
  return fitted({ class: "chart", role: "img",
    "aria-label": "Spend per day: " + days.map((d) => `${d.day} ${money(d.spend)}`).join(", ") },
  (width, height) => {
    const top = LABEL_PX + 8, bottom = height - LABEL_PX - 10;
    const step = width / Math.max(days.length, 1);
    const gap = Math.min(4, step / 4);
    // As many date labels as fit, about 56 px apart ("11-30" at 12 px is about 34 px wide).
    const every = Math.max(1, Math.ceil(days.length / Math.max(1, Math.floor(width / 56))));
    return [
      svg("line", { x1: 0, y1: bottom, x2: width, y2: bottom }),
      svg("text", { x: 0, y: LABEL_PX }, "max " + money(most)),
      ...days.map((d, i) => {
        const h = ((bottom - top) * d.spend) / most;
        return svg("g", {},
          svg("rect", { class: "bar", x: i * step + gap / 2, y: bottom - h,
            width: Math.max(step - gap, 1), height: h }, svg("title", {}, `${d.day}: ${money(d.spend)}`)),
          i % every === 0 ? svg("text", { x: i * step, y: height - 2 }, d.day.slice(5)) : null);
      }),
    ];
  }).node;
}

function lastDays(n) {
  const out = [];
  for (let i = n - 1; i >= 0; i--) out.push(new Date(Date.now() - i * 86400000).toISOString().slice(0, 10));
  return out;
}

function topSpenders(rows, field, n = 8) {
  return rows.slice(0, n).map((r) => ({ name: r[field], spend: r.total_spend }));
}

// A top key by its alias, else its preview, else its hash marked as one (a key deleted since,
// or made before previews).
function keyName(row) {
  return row.key_alias ? el("span", { text: row.key_alias }) : keyPreview(row, row.api_key);
}

let liveTimer = null;

async function spendPage() {
  // The live counts come with the rest, so the panel is drawn complete from the first poll.
  const [byTeam, byModel, byKey, byCustomer, total, live] = await Promise.all([
    api("GET", "/global/spend/report?group_by=team"), api("GET", "/global/spend/models?limit=8"),
    api("GET", "/global/spend/keys?limit=8"), api("POST", "/global/spend/end_users", {}),
    api("GET", "/global/spend"), api("GET", "/ui/api/live")]);
  const perDay = {};
  for (const day of byTeam) {
    perDay[day.group_by_day] = day.teams.reduce((sum, t) => sum + t.total_spend, 0);
  }
  const days = lastDays(30).map((day) => ({ day, spend: perDay[day] || 0 }));
  const topTable = (title, rows, label) => el("section", { class: "card" },
    el("h2", { text: title }),
    table(title, [{ title: label, cls: "id", value: (r) => r.name },
      { title: "Spend", num: true, value: (r) => money(r.spend) }], rows));
  const panel = livePanel();
  panel.show(live);
  const timer = setInterval(async () => {
    // Gone from the page (another page rendered meanwhile): stop polling.
    if (!panel.node.isConnected) { clearInterval(timer); return; }
    try { panel.show(await api("GET", "/ui/api/live")); } catch { /* shown stale; next poll */ }
  }, 2000);
  liveTimer = timer;
  return [
    header("Spend"),
    el("div", { class: "grid" },
      el("section", { class: "card" }, el("h2", { text: "Last 30 days" }),
        el("p", { class: "stat", id: "total-spend", text: money(total.spend) }),
        el("p", { class: "muted", text: total.max_budget != null
          ? `of a proxy budget of ${money(total.max_budget)}` : "no proxy-wide budget" })),
      panel.node),
    el("section", { class: "card" }, el("h2", { text: "Spend per day" }), dailyChart(days)),
    el("div", { class: "grid" },
      topTable("Top keys", byKey.slice(0, 8).map((r) => ({ name: keyName(r), spend: r.total_spend })), "Key"),
      topTable("Top customers", topSpenders(byCustomer, "end_user"), "Customer"),
      topTable("Top models", topSpenders(byModel, "model"), "Model")),
  ];
}

// Requests per second now, a sparkline of the last minute, and recent 429s by reason: all
// from /ui/api/live, which keeps that history (summed over sidecars) on the server.
function livePanel() {
  let rps = [];
  const rate = el("p", { class: "stat", id: "live-rps" });
  const refusals = el("div", { id: "live-429" });
  const recent = el("h2", {});
  const spark = fitted({ class: "spark", id: "live-spark", "aria-hidden": "true" }, (width, height) => {
    const most = Math.max(...rps, 1);
    const x = (i) => (rps.length > 1 ? (i * width) / (rps.length - 1) : width);
    return [svg("polyline", { points: rps.map((v, i) =>
      `${x(i)},${height - 1 - (v * (height - 2)) / most}`).join(" ") })];
  });
  const show = (live) => {
    rps = live.rps || [];
    const now = rps.length ? rps[rps.length - 1] : 0;
    rate.textContent = now.toFixed(1) + " /s";
    rate.title = `summed over ${plural(live.sidecars, "sidecar")}`;
    spark.redraw();
    recent.textContent = `429s by reason, last ${live.recent_seconds} s`;
    const rows = Object.entries(live.recent_refused || {});
    refusals.replaceChildren(rows.length
      ? el("ul", {}, rows.map(([reason, n]) => el("li", {}, `${reason}: ${n}`)))
      : el("p", { class: "muted", text: "none" }));
    shadow.show(live);
  };
  const shadow = shadowRefusals();
  const node = el("section", { class: "card", "aria-live": "polite" },
    el("h2", { text: "Requests per second, last minute" }), rate, spark.node, recent, refusals,
    shadow.node);
  return { node, show };
}

// Would-be 429s of shadow limits (served all the same), by reason and scope: beside the real
// 429s, so an operator sees what enforcing them would refuse before turning them on.
function shadowRefusals() {
  const title = el("h2", {});
  const list = el("div", { id: "live-shadow-429" });
  const show = (live) => {
    title.textContent = `Shadow limits: would-be 429s, last ${live.recent_seconds} s`;
    const recent = Object.entries(live.recent_shadow_refused || {});
    const total = Object.entries(live.shadow_refused || {});
    list.replaceChildren(recent.length
      ? el("ul", {}, recent.map(([reason, n]) => el("li", {}, `${reason}: ${n}`)))
      : el("p", { class: "muted", text: "none" }),
    total.length ? el("p", { class: "muted", text: "since the sidecars started: " +
      total.map(([reason, n]) => `${reason}: ${n}`).join(", ") }) : null);
  };
  return { node: el("div", {}, title, list), show };
}

// -- routing, sign-in ------------------------------------------------------------------------

const PAGES = {
  budgets: budgetsPage, keys: keysPage, users: usersPage, teams: teamsPage,
  customers: customersPage, models: modelsPage, spend: spendPage, tags: tagsPage,
};

async function render() {
  if (liveTimer) { clearInterval(liveTimer); liveTimer = null; }
  const name = (location.hash.match(/^#\/(\w+)/) || [])[1] || "budgets";
  const page = document.getElementById("page");
  for (const link of document.querySelectorAll("#nav a")) {
    if (link.getAttribute("href") === "#/" + name) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  try {
    page.replaceChildren(...(await (PAGES[name] || budgetsPage)()));
  } catch (err) {
    page.replaceChildren(el("p", { class: "error", role: "alert", text: err.message }));
  }
}

function showApp(signedIn) {
  document.getElementById("sign-in").hidden = signedIn;
  document.getElementById("page").hidden = !signedIn;
  document.getElementById("nav").hidden = !signedIn;
  document.getElementById("sign-out").hidden = !signedIn;
}

function signOut(message) {
  sessionStorage.removeItem(KEY_STORE);
  if (liveTimer) { clearInterval(liveTimer); liveTimer = null; }
  showApp(false);
  document.getElementById("sign-in-error").textContent = message || "";
}

document.addEventListener("DOMContentLoaded", () => {
  document.getElementById("sign-in-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const input = document.getElementById("master-key");
    sessionStorage.setItem(KEY_STORE, input.value.trim());
    try {
      await api("GET", "/key/list");
    } catch (err) {
      sessionStorage.removeItem(KEY_STORE);
      document.getElementById("sign-in-error").textContent =
        err.status === 401 ? "That is not the master key." : err.message;
      input.setAttribute("aria-invalid", "true");
      input.focus();
      return;
    }
    input.value = "";
    input.removeAttribute("aria-invalid");
    showApp(true);
    await render();
    document.getElementById("main").focus();
  });
  document.getElementById("sign-out").addEventListener("click", () => signOut("Signed out."));
  window.addEventListener("hashchange", () => sessionStorage.getItem(KEY_STORE) && render());
  if (sessionStorage.getItem(KEY_STORE)) {
    showApp(true);
    render();
  }
});
