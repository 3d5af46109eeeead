// The gateway's dashboard. It logs in through the vSphere session API and then reads
// the same /api resources as any client, with the session token in the
// vmware-api-session-id header. Every value from the endpoint goes into the page as text
// (textContent, attributes of created elements), never as markup: VM, user and edge
// names come from peers. The token lives in this page's memory only, so closing or
// reloading the tab ends the dashboard's hold on it.
'use strict';

(function () {
  const POLL_MS = 1500;
  // The inventory changes slowly; migrations and links are what moves.
  const INVENTORY_EVERY = 3;
  const SVG = 'http://www.w3.org/2000/svg';

  const state = {
    token: null,
    me: null, // {user, role, may_migrate}
    timer: null,
    // Bumped at each login and logout: a poll still in flight from an earlier session
    // neither renders nor schedules another.
    generation: 0,
    tick: 0,
    selected: null, // migration id whose receipt and report are shown
    detailsFor: null,
    migrations: [],
    traces: new Map(), // migration id -> link trace
    taskProgress: new Map(), // migration id -> bytes held durably (no trace)
  };

  const $ = (id) => document.getElementById(id);

  function el(tag, attrs, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === 'class') e.className = v;
      else if (k.startsWith('data-')) e.setAttribute(k, v);
      else e[k] = v;
    }
    for (const c of children) {
      if (c === null || c === undefined) continue;
      e.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return e;
  }

  function td(text, cls) {
    return el('td', cls ? { class: cls } : {}, text);
  }

  // ---- formatting ----------------------------------------------------------------

  function bytes(n) {
    if (n === null || n === undefined) return '—';
    const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB'];
    let i = 0;
    let v = n;
    while (v >= 1024 && i < units.length - 1) { v /= 1024; i++; }
    return (i === 0 ? v.toFixed(0) : v.toFixed(v < 10 ? 2 : 1)) + ' ' + units[i];
  }

  function rate(bps) {
    if (bps === null || bps === undefined) return '—';
    return bytes(bps) + '/s (' + (bps * 8 / 1e6).toFixed(1) + ' Mbit/s)';
  }

  function duration(s) {
    if (s === null || s === undefined || !isFinite(s)) return '—';
    s = Math.round(s);
    const h = Math.floor(s / 3600);
    const m = Math.floor((s % 3600) / 60);
    const sec = s % 60;
    const two = (x) => String(x).padStart(2, '0');
    return h > 0 ? h + ':' + two(m) + ':' + two(sec) : m + ':' + two(sec);
  }

  function time(iso) {
    if (!iso) return '—';
    const d = new Date(iso);
    return isNaN(d) ? iso : d.toLocaleString();
  }

  // ---- the API -------------------------------------------------------------------

  class Unauthenticated extends Error {}

  // A request the browser dropped before any answer came (fetch rejects with a
  // TypeError: a reset connection, or Chromium's net::ERR_NETWORK_CHANGED when a network
  // interface of the machine comes or goes) is sent once more if repeating it is safe:
  // reads, DELETE, and the login (at worst a second session, which times out unused).
  // An action (abort, switchover) is never sent twice.
  async function send(path, init, repeatable) {
    try {
      return await fetch(path, init);
    } catch (e) {
      if (!repeatable || !(e instanceof TypeError)) throw e;
      await new Promise((resolve) => setTimeout(resolve, 250));
      return fetch(path, init);
    }
  }

  async function api(method, path, body) {
    const headers = { 'vmware-api-session-id': state.token };
    if (body !== undefined) headers['content-type'] = 'application/json';
    const r = await send(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      cache: 'no-store',
      credentials: 'omit',
    }, method === 'GET' || method === 'DELETE');
    if (r.status === 401) throw new Unauthenticated('the session ended; log in again');
    const text = await r.text();
    if (!r.ok) {
      let message = r.status + ' ' + r.statusText;
      try {
        const e = JSON.parse(text);
        if (e.messages && e.messages.length) message = e.messages.map((m) => m.default_message).join('; ');
      } catch (_) { /* not JSON: keep the status */ }
      const err = new Error(message);
      err.status = r.status;
      throw err;
    }
    return text === '' ? null : JSON.parse(text);
  }

  function base64Utf8(s) {
    let bin = '';
    for (const b of new TextEncoder().encode(s)) bin += String.fromCharCode(b);
    return btoa(bin);
  }

  async function login(user, password) {
    const r = await send('/api/session', {
      method: 'POST',
      headers: { authorization: 'Basic ' + base64Utf8(user + ':' + password) },
      cache: 'no-store',
      credentials: 'omit',
    }, true);
    if (!r.ok) {
      throw new Error(r.status === 401 ? 'wrong user or password (or too many tries: wait a moment)'
        : r.status === 503 ? 'the endpoint is busy: try again in a moment'
          : 'login failed: ' + r.status);
    }
    state.token = await r.json();
    state.me = await api('GET', '/api/gateway/session');
  }

  // ---- screens -------------------------------------------------------------------

  function showLogin(message) {
    state.generation++;
    clearTimeout(state.timer);
    state.timer = null;
    state.token = null;
    state.me = null;
    $('board').hidden = true;
    $('who').hidden = true;
    $('login').hidden = false;
    $('login-error').textContent = message || '';
    $('password').value = '';
  }

  function showBoard() {
    $('login').hidden = true;
    $('board').hidden = false;
    $('who').hidden = false;
    $('who-user').textContent = state.me.user;
    $('who-role').textContent = state.me.role;
    document.body.dataset.role = state.me.role;
    state.generation++;
    state.tick = 0;
    poll(state.generation);
  }

  function status(text, isError) {
    const s = $('status');
    s.textContent = text;
    s.className = isError ? 'status error' : 'status';
  }

  // ---- polling -------------------------------------------------------------------

  async function poll(generation) {
    clearTimeout(state.timer);
    const current = () => generation === state.generation;
    try {
      const [migrations, links] = await Promise.all([
        api('GET', '/api/gateway/migrations'),
        api('GET', '/api/gateway/links'),
      ]);
      if (!current()) return;
      state.migrations = migrations;
      state.traces = new Map(links.map((t) => [t.migration, t]));
      // A migration no connection serves now (waiting for its edge to resume it, or
      // the endpoint restarted) has no trace: its task still says what it holds.
      const waiting = migrations.filter((m) => m.state === 'RUNNING' && !state.traces.has(m.id));
      const tasks = await Promise.all(waiting.map((m) => api('GET', '/api/cis/tasks/' + encodeURIComponent(m.id)).catch(() => null)));
      state.taskProgress = new Map();
      if (!current()) return;
      waiting.forEach((m, i) => { if (tasks[i]) state.taskProgress.set(m.id, tasks[i].progress.completed); });
      renderMigrations();
      renderLinks();
      if (state.tick % INVENTORY_EVERY === 0) await refreshInventory();
      if (state.selected) await refreshDetails();
      status('Updated ' + new Date().toLocaleTimeString());
      document.body.dataset.polls = String(state.tick + 1);
    } catch (e) {
      if (!current()) return;
      if (e instanceof Unauthenticated) { showLogin(e.message); return; }
      status('Cannot reach the endpoint: ' + e.message, true);
    }
    if (!current()) return;
    state.tick++;
    state.timer = setTimeout(() => poll(generation), POLL_MS);
  }

  // ---- migrations ----------------------------------------------------------------

  function mayAct(m) {
    // The server checks again: an operator may act on their own migrations only.
    return state.me.may_migrate
      && (state.me.role === 'Administrator' || m.user.toLowerCase() === state.me.user.toLowerCase());
  }

  function progressOf(m) {
    if (m.state === 'SUCCEEDED') return { done: m.logical_bytes, total: m.logical_bytes };
    const trace = state.traces.get(m.id);
    const last = trace && trace.samples.length ? trace.samples[trace.samples.length - 1] : null;
    if (last) {
      return { done: last.durable_bytes, total: last.total_bytes || m.logical_bytes, rate: last.rate_bytes_per_second, eta: last.eta_seconds };
    }
    if (state.taskProgress.has(m.id)) return { done: state.taskProgress.get(m.id), total: m.logical_bytes };
    return { done: m.state === 'RUNNING' ? 0 : null, total: m.logical_bytes };
  }

  function stateText(m) {
    if (m.replica && m.replica.state) return m.state + ' · ' + m.replica.state;
    if (m.state === 'RUNNING' && !state.traces.has(m.id)) return 'RUNNING · waiting for its edge';
    return m.state;
  }

  function renderMigrations() {
    const body = $('migrations').tBodies[0];
    const rows = [];
    // Newest first: what moves now is at the top.
    for (const m of [...state.migrations].reverse()) {
      const p = progressOf(m);
      const fraction = p.done !== null && p.total ? Math.min(1, p.done / p.total) : null;
      const bar = el('progress', { max: 1, class: 'progress' });
      if (fraction !== null) bar.value = fraction;
      const pct = el('span', { class: 'pct' }, fraction === null ? '—' : (fraction * 100).toFixed(1) + ' %');
      const actions = el('td', { class: 'actions' });
      if (m.has_receipt) {
        actions.append(el('button', {
          type: 'button', class: 'secondary receipt', onclick: () => select(m.id),
        }, 'Receipt'));
      }
      if (m.state === 'RUNNING' && mayAct(m)) {
        if (m.replica) {
          actions.append(el('button', {
            type: 'button', class: 'switchover', title: 'The edge switches over at its next pass',
            onclick: () => switchover(m),
          }, 'Switch over'));
        }
        actions.append(el('button', { type: 'button', class: 'danger abort', onclick: () => abort(m) }, 'Abort'));
      }
      if (m.replica && m.replica.state === 'switched over (awaiting confirm)' && mayAct(m)) {
        actions.append(el('button', {
          type: 'button', class: 'confirm', title: 'Make the switchover final: no rollback afterwards',
          onclick: () => endSwitchover(m, true),
        }, 'Confirm'));
        actions.append(el('button', {
          type: 'button', class: 'danger rollback',
          title: 'Power the cloud VM off and keep its disks as the replica; the source can run again',
          onclick: () => endSwitchover(m, false),
        }, 'Rollback'));
      }
      const tr = el('tr', { 'data-id': m.id, 'data-state': m.state },
        td(m.id),
        td(m.vm ? m.vm_name + ' → ' + m.vm : m.vm_name),
        td(m.replica ? 'replication' : 'migration'),
        el('td', { class: 'state-' + m.state, title: m.error || '' }, stateText(m)),
        el('td', {}, bar, ' ', pct, ' ', el('small', {}, bytes(p.done) + ' / ' + bytes(p.total))),
        td(m.state === 'RUNNING' ? rate(p.rate) : '—', 'num'),
        td(m.state === 'RUNNING' ? duration(p.eta) : '—', 'num'),
        td(m.user),
        td(time(m.started)),
        actions);
      if (p.done !== null) tr.setAttribute('data-completed', String(p.done));
      if (m.id === state.selected) tr.className = 'selected';
      rows.push(tr);
    }
    body.replaceChildren(...rows);
    $('migrations-empty').hidden = rows.length > 0;
  }

  async function abort(m) {
    if (!window.confirm('Abort ' + m.id + ' (' + m.vm_name + ')? Its partial files are removed.')) return;
    try {
      await api('POST', '/api/gateway/migrations/' + encodeURIComponent(m.id) + '?action=abort');
      status(m.id + ' aborted');
    } catch (e) {
      status('Abort of ' + m.id + ' refused: ' + e.message, true);
    }
  }

  async function switchover(m) {
    if (!window.confirm('Switch ' + m.vm_name + ' over at the next pass of its edge?')) return;
    try {
      await api('PATCH', '/api/gateway/migrations/' + encodeURIComponent(m.id), { switchover_at: new Date().toISOString() });
      status(m.id + ': the edge switches over at its next pass');
    } catch (e) {
      status('Switchover of ' + m.id + ' refused: ' + e.message, true);
    }
  }

  async function endSwitchover(m, confirm) {
    const question = confirm
      ? 'Confirm the switchover of ' + m.vm_name + ' to ' + m.vm + '? It becomes final: no rollback afterwards.'
      : 'Roll back the switchover of ' + m.vm_name + '? ' + m.vm + ' is powered off and unregistered; its disks become the replica again.';
    if (!window.confirm(question)) return;
    const action = confirm ? 'confirm' : 'rollback';
    try {
      const ended = await api('POST', '/api/gateway/migrations/' + encodeURIComponent(m.id) + '?action=' + action);
      status(ended.message);
    } catch (e) {
      status((confirm ? 'Confirmation' : 'Rollback') + ' of ' + m.id + ' refused: ' + e.message, true);
    }
  }

  // ---- receipt and report --------------------------------------------------------

  function select(id) {
    state.selected = id;
    state.detailsFor = null;
    renderMigrations();
    refreshDetails();
  }

  async function refreshDetails() {
    const id = state.selected;
    const m = state.migrations.find((x) => x.id === id);
    if (!m || state.detailsFor === id) return;
    state.detailsFor = id;
    $('details').hidden = false;
    $('details-id').textContent = id;
    $('details-summary').textContent = m.vm_name + (m.vm ? ' registered as ' + m.vm : '') + ', ' + m.state
      + ', by ' + m.user + ', ' + time(m.started) + ' – ' + time(m.finished) + ', ' + bytes(m.logical_bytes);
    const path = '/api/gateway/migrations/' + encodeURIComponent(id);
    const show = async (what, target) => {
      try {
        $(target).textContent = JSON.stringify(await api('GET', path + '/' + what), null, 2);
      } catch (e) {
        if (e instanceof Unauthenticated) throw e;
        $(target).textContent = e.message;
      }
    };
    await Promise.all([show('receipt', 'receipt'), show('report', 'report')]);
  }

  // ---- links ---------------------------------------------------------------------

  function chart(title, points, unit, cls) {
    const w = 260;
    const h = 80;
    const pad = 4;
    const svg = document.createElementNS(SVG, 'svg');
    svg.setAttribute('width', w);
    svg.setAttribute('height', h);
    svg.setAttribute('viewBox', '0 0 ' + w + ' ' + h);
    svg.setAttribute('class', cls);
    const axis = document.createElementNS(SVG, 'line');
    axis.setAttribute('x1', 0); axis.setAttribute('x2', w);
    axis.setAttribute('y1', h - pad); axis.setAttribute('y2', h - pad);
    axis.setAttribute('class', 'axis');
    svg.append(axis);
    const max = Math.max(...points.map((p) => p[1]), 1e-9);
    if (points.length > 1) {
      const t0 = points[0][0];
      const span = Math.max(points[points.length - 1][0] - t0, 1);
      const line = document.createElementNS(SVG, 'polyline');
      line.setAttribute('points', points.map(([t, v]) =>
        ((t - t0) / span * (w - 2 * pad) + pad).toFixed(1) + ',' + (h - pad - v / max * (h - 2 * pad - 10)).toFixed(1)).join(' '));
      line.setAttribute('class', 'line');
      svg.append(line);
    }
    const label = document.createElementNS(SVG, 'text');
    label.setAttribute('x', pad);
    label.setAttribute('y', 11);
    const last = points.length ? points[points.length - 1][1] : null;
    label.textContent = 'now ' + (last === null ? '—' : fmt(last) + ' ' + unit) + ', max ' + fmt(max) + ' ' + unit;
    svg.append(label);
    return el('figure', { class: 'chart' }, el('figcaption', {}, title), svg);
  }

  function fmt(v) {
    return v >= 100 ? v.toFixed(0) : v >= 10 ? v.toFixed(1) : v.toFixed(2);
  }

  // An edge is its certificate: each connection comes from another port, and an edge
  // reconnecting to resume is still the same edge.
  function edgeOf(t) {
    const at = t.edge.indexOf(' cert ');
    return at < 0 ? { id: t.edge, from: '' } : { id: t.edge.slice(at + 6), from: t.edge.slice(0, at) };
  }

  function renderLinks() {
    const byEdge = new Map();
    for (const t of state.traces.values()) {
      const edge = edgeOf(t).id;
      if (!byEdge.has(edge)) byEdge.set(edge, []);
      byEdge.get(edge).push(t);
    }
    const out = [];
    for (const [edge, traces] of byEdge) {
      const box = el('div', { class: 'edge', 'data-edge': edge }, el('h3', {}, 'Edge certificate ' + edge));
      for (const t of traces) {
        const s = t.samples;
        const m = state.migrations.find((x) => x.id === t.migration);
        const rtt = s.map((x) => [x.at_ms, x.rtt_ms]);
        const loss = s.slice(1).map((x, i) => {
          const sent = x.sent_packets - s[i].sent_packets;
          const lost = x.lost_packets - s[i].lost_packets;
          return [x.at_ms, sent > 0 ? Math.max(0, lost) / sent * 100 : 0];
        });
        const thr = s.map((x) => [x.at_ms, x.rate_bytes_per_second * 8 / 1e6]);
        box.append(
          el('p', {}, t.migration + (m ? ' · ' + m.vm_name : '') + (edgeOf(t).from ? ' · from ' + edgeOf(t).from : '')),
          el('div', { class: 'charts' },
            chart('RTT', rtt, 'ms', 'rtt'),
            chart('Loss', loss, '%', 'loss'),
            chart('Throughput', thr, 'Mbit/s', 'throughput')));
      }
      out.push(box);
    }
    $('links').replaceChildren(...out);
    $('links-empty').hidden = out.length > 0;
  }

  // ---- inventory -----------------------------------------------------------------

  async function refreshInventory() {
    const [hosts, datastores, vms] = await Promise.all([
      api('GET', '/api/vcenter/host'),
      api('GET', '/api/vcenter/datastore'),
      api('GET', '/api/vcenter/vm'),
    ]);
    $('hosts').tBodies[0].replaceChildren(...hosts.map((h) => el('tr', { 'data-id': h.host },
      td(h.host), td(h.name), td(h.connection_state), td(h.power_state, h.power_state))));
    $('datastores').tBodies[0].replaceChildren(...datastores.map((d) => {
      const used = d.capacity > 0 ? (d.capacity - d.free_space) / d.capacity : 0;
      const bar = el('progress', { max: 1, value: used });
      return el('tr', { 'data-id': d.datastore },
        td(d.datastore), td(d.name), td(d.type), td(bytes(d.capacity), 'num'), td(bytes(d.free_space), 'num'),
        el('td', {}, bar, ' ', (used * 100).toFixed(0) + ' %'));
    }));
    $('vms').tBodies[0].replaceChildren(...vms.map((v) => el('tr', { 'data-id': v.vm },
      td(v.vm), td(v.name), td(v.power_state, v.power_state), td(v.cpu_count, 'num'), td(v.memory_size_MiB + ' MiB', 'num'))));
  }

  // ---- start ---------------------------------------------------------------------

  document.addEventListener('DOMContentLoaded', () => {
    $('login-form').addEventListener('submit', async (ev) => {
      ev.preventDefault();
      $('login-error').textContent = '';
      $('login-button').disabled = true;
      try {
        await login($('user').value.trim(), $('password').value);
        $('password').value = '';
        showBoard();
      } catch (e) {
        state.token = null;
        $('login-error').textContent = e.message;
      } finally {
        $('login-button').disabled = false;
      }
    });
    $('logout').addEventListener('click', async () => {
      try { await api('DELETE', '/api/session'); } catch (_) { /* ended already */ }
      showLogin('Logged out.');
    });
    document.body.dataset.ready = 'true';
  });
}());
