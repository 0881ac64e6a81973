// The Sealcast dashboard: the retained status topics (PROTOCOL.md 13) over MQTT on
// WebSocket at this page's own origin (/mqtt), and admin requests (PROTOCOL.md 12) for an
// admin account. No secret is kept but the session's login, in memory.
'use strict';

const $ = (sel) => document.querySelector(sel);
const el = (tag, attrs = {}, ...children) => {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === 'class') e.className = v; else if (k.startsWith('data-')) e.setAttribute(k, v); else e[k] = v;
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return e;
};

const state = {
  client: null, clientId: '', admin: false, requests: new Map(), seq: 0,
  fleet: null, releases: new Map(), selected: null, devices: [], nextDevices: '', device: null,
};

function bar(done, failed, total) {
  const b = el('div', { class: 'bar' });
  const pct = total > 0 ? (100 * done) / total : 0;
  const fpct = total > 0 ? (100 * failed) / total : 0;
  const ok = el('div'); ok.style.width = pct + '%';
  const bad = el('div', { class: 'failed' }); bad.style.width = fpct + '%';
  b.append(ok, bad);
  b.title = `${done} of ${total} installed, ${failed} failed`;
  return b;
}

// span formats a number of seconds as the bounds of the time-to-installed curve read:
// 5s, 2m, 4h, 7d.
function span(s) {
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${s / 60}m`;
  if (s < 86400) return `${s / 3600}h`;
  return `${s / 86400}d`;
}

// curve draws a release's time-to-installed curve (PROTOCOL.md 13.2 install_times): the
// share of its targets installed within each bound of time from its start, as an SVG
// step line, one step a bound.
// The bounds of the curve, in seconds (PROTOCOL.md 13.2).
const installBounds = [5, 10, 20, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 28800,
  43200, 86400, 172800, 345600, 604800, 1209600, 2592000];

function curve(r) {
  const given = r.install_times || [];
  if (!given.length || !r.targets) return [];
  // A curve that ends early is drawn over six bounds at least, flat after its end.
  const last = given[given.length - 1];
  const pts = given.concat(installBounds.slice(given.length, 6).map((within) => ({ within, installed: last.installed })));
  const ns = 'http://www.w3.org/2000/svg';
  const svg = (tag, attrs, text) => {
    const e = document.createElementNS(ns, tag);
    for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
    if (text !== undefined) e.textContent = text;
    return e;
  };
  const W = 520, H = 170, L = 40, B = 22, T = 8;
  const step = (W - L - 10) / pts.length;
  const y = (n) => T + (H - T - B) * (1 - n / r.targets);
  const g = svg('svg', { viewBox: `0 0 ${W} ${H}`, class: 'curve', 'data-curve': pts.length, role: 'img' });
  g.append(svg('title', {}, 'Targets installed within each time of the release\'s start'));
  for (const f of [0, 0.5, 1]) {
    g.append(svg('line', { x1: L, x2: W - 10, y1: y(f * r.targets), y2: y(f * r.targets), class: 'grid' }));
    g.append(svg('text', { x: L - 4, y: y(f * r.targets) + 4, 'text-anchor': 'end' }, `${f * 100}%`));
  }
  g.append(svg('text', { x: L, y: H - 6, 'text-anchor': 'middle' }, '0'));
  let d = `M ${L} ${y(0)}`;
  pts.forEach((p, i) => {
    const x = L + step * (i + 1);
    d += ` H ${x} V ${y(p.installed)}`;
    if (pts.length <= 12 || i % 2 === pts.length % 2) g.append(svg('text', { x, y: H - 6, 'text-anchor': 'middle' }, span(p.within)));
  });
  g.append(svg('path', { d, class: 'line' }));
  return [el('p', {}, `Installed within a time of the release's start: ${last.installed} of ${r.targets} within ${span(last.within)}`), g];
}

// request sends an admin request and resolves with its result (rejects with its error).
function request(cmd, args) {
  const id = `${state.clientId}-${++state.seq}`;
  return new Promise((resolve, reject) => {
    state.requests.set(id, { resolve, reject });
    const m = new Paho.Message(JSON.stringify({ id, cmd, args }));
    m.destinationName = 'sealcast/admin/requests';
    m.qos = 1;
    state.client.send(m);
    setTimeout(() => {
      if (state.requests.delete(id)) reject(new Error('no reply from the service in time'));
    }, 30000);
  });
}

function onMessage(m) {
  const topic = m.destinationName;
  let doc;
  try { doc = m.payloadString ? JSON.parse(m.payloadString) : null; } catch { return; }
  if (topic === 'sealcast/status/fleet') {
    state.fleet = doc;
    renderFleet();
  } else if (topic.startsWith('sealcast/status/releases/')) {
    const id = topic.slice('sealcast/status/releases/'.length);
    if (doc) state.releases.set(id, doc); else state.releases.delete(id);
    renderReleases();
    if (state.selected === id) renderRelease();
    refreshDevicesSoon();
    if (state.device) refreshDeviceSoon();
  } else if (topic.startsWith('sealcast/admin/replies/') && doc) {
    const r = state.requests.get(doc.id);
    if (!r) return;
    state.requests.delete(doc.id);
    if (doc.ok) r.resolve(doc.result); else r.reject(new Error(`${doc.error.code}: ${doc.error.message}`));
  }
}

function renderFleet() {
  const f = state.fleet;
  if (!f) return;
  const by = Object.entries(f.releases || {}).map(([s, n]) => `${n} ${s}`).join(', ') || 'no releases';
  const versions = Object.entries(f.versions || {}).sort((a, b) => Number(b[0]) - Number(a[0]));
  const chart = versions.map(([v, count]) => el('div', { class: 'version', 'data-version': v },
    el('span', {}, `v${v}`), bar(count, 0, f.devices), el('span', {}, `${count}`)));
  $('#fleet-summary').replaceChildren(
    el('p', {}, el('strong', { 'data-fleet': 'devices' }, f.devices), ' devices, ',
      el('strong', { 'data-fleet': 'online' }, f.online), ' online; releases: ', by),
    ...(chart.length ? [el('p', {}, 'Installed versions:'), ...chart] : []));
}

function act(id, cmd) {
  return request(cmd, { release: id }).then((st) => {
    state.releases.set(id, st);
    renderReleases();
  }).catch((e) => alert(e.message));
}

function renderReleases() {
  const rows = [...state.releases.values()].sort((a, b) => b.version - a.version).map((r) => {
    const actions = el('td', { class: 'admin' });
    const button = (label, cmd) => {
      const b = el('button', { 'data-action': cmd, type: 'button' }, label);
      b.addEventListener('click', (ev) => { ev.stopPropagation(); act(r.release, 'release.' + cmd); });
      actions.append(b);
    };
    if (r.state === 'active') button('Pause', 'pause');
    if (r.state === 'paused') button('Resume', 'resume');
    if (r.next_wave === 'approval') button('Approve next wave', 'approve');
    if (r.state === 'active' || r.state === 'paused') button('Cancel', 'cancel');
    const wave = r.waves ? `${r.wave}/${r.waves.length}` : '-';
    const tr = el('tr', { 'data-release': r.release },
      el('td', {}, r.version), el('td', {}, r.label || ''),
      el('td', { class: 'state' }, r.state + (r.pause_reason ? ` (${r.pause_reason})` : '')),
      el('td', {}, wave), el('td', {}, r.targets), el('td', { class: 'installed' }, r.installed),
      el('td', {}, r.failed), el('td', {}, r.timed_out || 0),
      el('td', {}, bar(r.installed, r.failed, r.targets)), actions);
    if (state.selected === r.release) tr.classList.add('selected');
    tr.addEventListener('click', () => { state.selected = r.release; renderReleases(); renderRelease(); });
    return tr;
  });
  $('#releases tbody').replaceChildren(...rows);
}

function renderRelease() {
  const r = state.releases.get(state.selected);
  if (!r) return;
  $('#release').hidden = false;
  $('#release-title').textContent = `Release ${r.version}${r.label ? ' ' + r.label : ''} (${r.release.slice(0, 8)})`;
  const waves = (r.waves || [{ wave: 1, size: r.targets, installed: r.installed, failed: r.failed, timed_out: r.timed_out || 0 }]).map((w) =>
    el('p', { 'data-wave': w.wave }, `Wave ${w.wave}: ${w.installed} of ${w.size} installed, ${w.failed} failed, ${w.timed_out} timed out `,
      !r.waves ? '' : w.closed ? '(closed) ' : w.opened ? '(open) ' : '(not opened) ', bar(w.installed, w.failed, w.size)));
  const codes = Object.entries(r.failures || {}).map(([code, count]) => el('span', { class: 'chip', 'data-failure': code }, `${code}: ${count}`));
  const failures = codes.length ? [el('p', {}, 'Failures by code: ', ...codes)] : [];
  const next = r.next_wave ? [el('p', {}, `Next wave waits for ${r.next_wave}${r.next_wave_at ? ' until ' + new Date(r.next_wave_at).toLocaleString() : ''}`)] : [];
  $('#release-waves').replaceChildren(...curve(r), ...waves, ...failures, ...next);
  if (state.admin && (r.state === 'active' || r.state === 'paused')) {
    request('release.pending', { release: r.release, limit: 50 }).then((p) => {
      $('#release-pending').replaceChildren(el('p', {}, `${p.total} devices still pending${p.total ? ': ' : ''}`,
        ...(p.pending || []).map((s) => el('span', { class: 'chip' }, s))));
    }).catch(() => {});
  } else {
    $('#release-pending').replaceChildren();
  }
}

// refreshDevicesSoon reads the first page of devices again within a second of a release's
// status changing (at most once a second), so versions and states follow the rollout.
let devicesTimer = null;
function refreshDevicesSoon() {
  if (!state.admin || devicesTimer || state.nextDevices && state.devices.length > 200) return;
  devicesTimer = setTimeout(() => { devicesTimer = null; loadDevices(false); }, 1000);
}

// refreshDeviceSoon reads the device shown again within a second of a release's status
// changing (at most once a second).
let deviceTimer = null;
function refreshDeviceSoon() {
  if (deviceTimer) return;
  deviceTimer = setTimeout(() => { deviceTimer = null; loadDevice(); }, 1000);
}

// Devices come page by page from the service (device.list), never from the per-device
// topics: with 100,000 devices the page stays small.
function loadDevices(more) {
  if (!state.admin) return;
  request('device.list', { after: more ? state.nextDevices : '', limit: 200 }).then((page) => {
    state.devices = more ? state.devices.concat(page.devices) : page.devices;
    state.nextDevices = page.next || '';
    $('#devices-more').hidden = !state.nextDevices;
    renderDevices();
  }).catch((e) => { $('#devices tbody').replaceChildren(el('tr', {}, el('td', {}, e.message))); });
}

function renderDevices() {
  const q = $('#device-filter').value.trim();
  const [k, v] = q.includes('=') ? q.split('=', 2) : [null, null];
  const match = (d) => !q || (k !== null ? d.tags && d.tags[k] === v :
    d.serial.includes(q) || d.state === q || String(d.version) === q);
  const rows = state.devices.filter(match).map((d) => {
    const tr = el('tr', { 'data-device': d.serial },
      el('td', {}, d.serial), el('td', {}, d.state), el('td', {}, d.version), el('td', {}, d.online ? 'yes' : 'no'),
      el('td', {}, d.last_result || ''), el('td', {}, ...tagChips(d.tags)));
    if (state.device === d.serial) tr.classList.add('selected');
    tr.addEventListener('click', () => { state.device = d.serial; renderDevices(); loadDevice(); });
    return tr;
  });
  $('#devices tbody').replaceChildren(...rows);
}

const tagChips = (tags) => Object.entries(tags || {}).map(([k, v]) => el('span', { class: 'chip' }, `${k}=${v}`));

// loadDevice shows one device as the service knows it (device.get): its last result
// and its part in the newest releases.
function loadDevice() {
  const serial = state.device;
  request('device.get', { serial }).then((d) => {
    if (state.device !== serial) return;
    $('#device').hidden = false;
    $('#device-title').textContent = `Device ${d.serial}`;
    const seen = d.last_seen ? new Date(d.last_seen).toLocaleString() : 'never';
    const history = (d.history || []).map((h) => el('tr', { 'data-history': h.release },
      el('td', {}, h.version), el('td', {}, h.label || ''), el('td', {}, h.state),
      el('td', { class: 'result' }, h.result + (h.code ? ` (${h.code})` : '')), el('td', {}, new Date(h.created).toLocaleString())));
    $('#device-summary').replaceChildren(
      el('p', {}, `State ${d.state}, version ${d.version}, chain position ${d.epoch}/${d.seq}; last result ${d.last_result || 'none'}; last seen ${seen} `, ...tagChips(d.tags)));
    $('#device-history tbody').replaceChildren(...(history.length ? history : [el('tr', {}, el('td', { colSpan: 5 }, 'no release yet'))]));
  }).catch((e) => { $('#device-summary').replaceChildren(el('p', { class: 'error' }, e.message)); });
}

function connect(user, password) {
  const proto = location.protocol === 'https:' ? 'wss:' : 'ws:';
  state.clientId = 'dash-' + Math.random().toString(36).slice(2, 10);
  const c = new Paho.Client(`${proto}//${location.host}/mqtt`, state.clientId);
  state.client = c;
  c.onMessageArrived = onMessage;
  c.onConnectionLost = (r) => {
    if (r.errorCode !== 0) { $('#error').textContent = 'connection lost: ' + r.errorMessage; $('#login').hidden = false; }
  };
  c.connect({
    userName: user, password, cleanSession: true, timeout: 10, keepAliveInterval: 30,
    onSuccess: () => {
      $('#login').hidden = true;
      $('#app').hidden = false;
      $('#who').textContent = `logged in as ${user}`;
      c.subscribe('sealcast/status/fleet', { qos: 1 });
      c.subscribe('sealcast/status/releases/+', { qos: 1 });
      // Only an admin may read the replies topic: the broker's answer says which we are.
      c.subscribe('sealcast/admin/replies/+', {
        qos: 1,
        onSuccess: () => { state.admin = true; document.body.classList.add('is-admin'); $('#who').textContent += ' (admin)'; loadDevices(false); },
        onFailure: () => { state.admin = false; $('#who').textContent += ' (monitor: watch only)'; },
      });
    },
    onFailure: (e) => { $('#error').textContent = 'log in failed: ' + e.errorMessage; },
  });
}

$('#login').addEventListener('submit', (ev) => {
  ev.preventDefault();
  $('#error').textContent = '';
  connect($('#user').value, $('#password').value);
});
$('#device-filter').addEventListener('input', renderDevices);
$('#devices-more').addEventListener('click', () => loadDevices(true));
// The first page of devices is read again every 10 s (a page, never the whole fleet).
setInterval(() => { if (state.admin && !state.nextDevices && state.devices.length <= 200) loadDevices(false); }, 10000);
