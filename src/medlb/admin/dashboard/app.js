/*
 * medlb live dashboard.
 *
 * Plain browser JavaScript, no build step: served as is by the admin server.
 * Charts use the vendored uPlot (vendor/uPlot.iife.min.js, MIT).
 *
 * Every piece of text that comes from the server (names, addresses, check
 * texts, error messages) goes into the DOM through textContent or
 * setAttribute, never through innerHTML, so names from the configuration are
 * always escaped.
 */
(function () {
  "use strict";

  var STATUS_EVERY_MS = 2000;
  var HISTORY_EVERY_MS = 5000;
  var WINDOW_S = 900;

  var COLORS = {
    sessions: "#1f5fbf",
    sessionsFill: "rgba(31, 95, 191, 0.10)",
    bytesIn: "#0f9488",
    bytesInFill: "rgba(15, 148, 136, 0.08)",
    bytesOut: "#7c3aed",
    bytesOutFill: "rgba(124, 58, 237, 0.06)",
    grid: "#edf0f4",
    axis: "#5d6879",
  };

  var ACTIONS = {
    drain: {
      label: "Drain",
      state: "drain",
      title: "Drain server",
      text: "sends no new sessions to this server; sessions already on it continue to their end and health checks go on.",
      done: "is draining",
    },
    maint: {
      label: "Halt",
      state: "maint",
      title: "Halt server",
      text: "puts this server in maintenance: no new sessions and no health checks; sessions already on it continue.",
      done: "is halted (maintenance)",
    },
    ready: {
      label: "Ready",
      state: "ready",
      title: "Make server ready",
      text: "returns this server to service: it takes new sessions again as soon as its health checks pass.",
      done: "is ready",
    },
  };

  // ---- state ---------------------------------------------------------------

  var generation = 0; // bumped on login/logout: late answers of an old generation are ignored
  var active = false;
  var statusTimer = null;
  var historyTimer = null;
  var statusInFlight = false;
  var statusAgain = false;
  var lastStatus = null;
  var history = null;
  var counters = new Map(); // key -> {t, bytesIn, bytesOut} from the previous status
  var rates = new Map(); // key -> {in, out} bytes per second
  var frontendViews = new Map();
  var backendViews = new Map();
  var bannerViews = new Map();
  var resizeObserver = typeof ResizeObserver === "function" ? new ResizeObserver(onResize) : null;
  var charts = new Set();
  var cardSerial = 0;

  // ---- small helpers -------------------------------------------------------

  function $(id) {
    return document.getElementById(id);
  }

  /** Create an element; attrs: class, text, or any attribute; children: nodes or strings (as text). */
  function el(tag, attrs) {
    var node = document.createElement(tag);
    if (attrs) {
      Object.keys(attrs).forEach(function (k) {
        var v = attrs[k];
        if (v === null || v === undefined || v === false) return;
        if (k === "class") node.className = v;
        else if (k === "text") node.textContent = String(v);
        else node.setAttribute(k, v === true ? "" : String(v));
      });
    }
    for (var i = 2; i < arguments.length; i++) {
      var c = arguments[i];
      if (c === null || c === undefined) continue;
      node.appendChild(typeof c === "string" ? document.createTextNode(c) : c);
    }
    return node;
  }

  function setText(node, text) {
    text = String(text);
    if (node.textContent !== text) node.textContent = text;
  }

  function setAttr(node, name, value) {
    value = String(value);
    if (node.getAttribute(name) !== value) node.setAttribute(name, value);
  }

  function fmtInt(n) {
    if (n === null || n === undefined || isNaN(n)) return "–";
    return Math.round(n).toLocaleString("en-US");
  }

  function fmtRate(n) {
    if (n === null || n === undefined || isNaN(n)) return "–";
    return (n >= 10 ? n.toFixed(0) : n.toFixed(1)) + "/s";
  }

  function fmtBytes(n) {
    if (n === null || n === undefined || isNaN(n)) return "–";
    var units = ["B", "kB", "MB", "GB", "TB"];
    var i = 0;
    while (Math.abs(n) >= 1000 && i < units.length - 1) {
      n /= 1000;
      i++;
    }
    var digits = i === 0 || Math.abs(n) >= 100 ? 0 : Math.abs(n) >= 10 ? 1 : 2;
    return n.toFixed(digits) + " " + units[i];
  }

  function fmtBytesRate(n) {
    return n === null || n === undefined || isNaN(n) ? "–" : fmtBytes(n) + "/s";
  }

  function fmtDuration(s) {
    s = Math.max(0, Math.floor(s));
    if (s < 60) return s + " s";
    var m = Math.floor(s / 60);
    if (m < 60) return m + " min" + (s % 60 ? " " + (s % 60) + " s" : "");
    var h = Math.floor(m / 60);
    if (h < 24) return h + " h" + (m % 60 ? " " + (m % 60) + " min" : "");
    var d = Math.floor(h / 24);
    return d + " d" + (h % 24 ? " " + (h % 24) + " h" : "");
  }

  function fmtAge(s) {
    if (s === null || s === undefined || isNaN(s)) return "";
    if (s < 1) return "just now";
    return fmtDuration(s) + " ago";
  }

  function fmtClock(unix) {
    return new Date(unix * 1000).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" });
  }

  function toast(message, kind) {
    var node = el("div", { class: "toast", "data-kind": kind || "info", text: message });
    $("toasts").appendChild(node);
    setTimeout(
      function () {
        node.remove();
      },
      kind === "error" ? 8000 : 4000,
    );
  }

  // ---- HTTP ------------------------------------------------------------------

  /** JSON request to the admin API; resolves {status, ok, data}; rejects only on network errors. */
  function api(method, path, body) {
    var headers = { Accept: "application/json" };
    var init = { method: method, credentials: "same-origin", cache: "no-store", headers: headers };
    if (method !== "GET") {
      headers["Content-Type"] = "application/json";
      headers["X-Medlb-Request"] = "1"; // CSRF guard required by the admin API
      init.body = JSON.stringify(body === undefined ? {} : body);
    }
    return fetch(path, init).then(function (res) {
      return res.text().then(function (text) {
        var data = null;
        try {
          data = text ? JSON.parse(text) : null;
        } catch (e) {
          data = null;
        }
        return { status: res.status, ok: res.ok, data: data };
      });
    });
  }

  function errorText(r) {
    return (r.data && typeof r.data.error === "string" && r.data.error) || "HTTP " + r.status;
  }

  // ---- login / logout --------------------------------------------------------

  function showLogin(message) {
    stop();
    clearData();
    $("dashboard").hidden = true;
    $("meta").hidden = true;
    $("live").hidden = true;
    $("logout").hidden = true;
    $("login-view").hidden = false;
    var err = $("login-error");
    err.hidden = !message;
    setText(err, message || "");
    var input = $("login-token");
    input.value = "";
    input.focus();
  }

  function showDashboard() {
    $("login-view").hidden = true;
    $("login-error").hidden = true;
    $("dashboard").hidden = false;
    $("meta").hidden = false;
    $("live").hidden = false;
    $("logout").hidden = false;
    start();
  }

  function onLoginSubmit(ev) {
    ev.preventDefault();
    var input = $("login-token");
    var err = $("login-error");
    var button = $("login-submit");
    var token = input.value.trim();
    if (!token) {
      err.hidden = false;
      setText(err, "Enter the admin token.");
      input.focus();
      return;
    }
    button.disabled = true;
    err.hidden = true;
    api("POST", "/api/v1/login", { token: token })
      .then(function (r) {
        input.value = "";
        if (r.ok) {
          showDashboard();
        } else {
          err.hidden = false;
          setText(err, r.status === 401 ? "Invalid token." : "Sign-in failed: " + errorText(r));
          input.focus();
        }
      })
      .catch(function () {
        err.hidden = false;
        setText(err, "Cannot reach the medlb admin server.");
      })
      .finally(function () {
        button.disabled = false;
      });
  }

  function onLogout() {
    api("POST", "/api/v1/logout")
      .catch(function () {
        return null;
      })
      .then(function () {
        showLogin("");
      });
  }

  // ---- polling ---------------------------------------------------------------

  function start() {
    stop();
    generation++;
    active = true;
    setLive("idle", "Connecting…");
    pollStatus();
    pollHistory();
  }

  function stop() {
    active = false;
    generation++;
    clearTimeout(statusTimer);
    clearTimeout(historyTimer);
    statusTimer = historyTimer = null;
    statusInFlight = false;
    statusAgain = false;
  }

  function setLive(state, text) {
    setAttr($("live"), "data-live", state);
    setText($("live-text"), text);
  }

  /** Poll now (after an action) without ever running two status requests at once. */
  function refreshNow() {
    if (!active) return;
    if (statusInFlight) {
      statusAgain = true;
      return;
    }
    clearTimeout(statusTimer);
    pollStatus();
  }

  function pollStatus() {
    var gen = generation;
    statusInFlight = true;
    api("GET", "/api/v1/status").then(
      function (r) {
        if (gen !== generation) return;
        statusInFlight = false;
        if (r.status === 401) {
          showLogin("Your session has ended. Sign in again.");
          return;
        }
        schedule();
        if (!r.ok || !r.data) {
          setLive("error", "Status failed: " + errorText(r));
          return;
        }
        renderStatus(r.data);
        setLive("ok", "Live · " + fmtClock(r.data.now));
      },
      function () {
        if (gen !== generation) return;
        statusInFlight = false;
        setLive("error", "Connection lost · retrying");
        schedule();
      },
    );

    function schedule() {
      if (!active) return;
      if (statusAgain) {
        statusAgain = false;
        statusTimer = setTimeout(pollStatus, 0);
      } else {
        statusTimer = setTimeout(pollStatus, STATUS_EVERY_MS);
      }
    }
  }

  function pollHistory() {
    var gen = generation;
    api("GET", "/api/v1/history").then(
      function (r) {
        if (gen !== generation) return;
        if (r.status === 401) {
          showLogin("Your session has ended. Sign in again.");
          return;
        }
        historyTimer = setTimeout(pollHistory, HISTORY_EVERY_MS);
        if (r.ok && r.data && Array.isArray(r.data.t)) {
          history = r.data;
          renderHistory();
        }
      },
      function () {
        if (gen !== generation) return;
        historyTimer = setTimeout(pollHistory, HISTORY_EVERY_MS);
      },
    );
  }

  // ---- rates -------------------------------------------------------------------

  /** Last non-null value of a history series, or null. */
  function lastValue(series) {
    if (!Array.isArray(series)) return null;
    for (var i = series.length - 1; i >= 0; i--) {
      if (series[i] !== null && series[i] !== undefined) return series[i];
    }
    return null;
  }

  /**
   * Bytes/s of an object: from the difference with the previous status when
   * there is one (updates every 2 s), else from the history's last sample.
   */
  function rateOf(key, obj, now, historyEntry) {
    var prev = counters.get(key);
    counters.set(key, { t: now, bytesIn: obj.bytes_in, bytesOut: obj.bytes_out });
    if (prev && now > prev.t && obj.bytes_in >= prev.bytesIn && obj.bytes_out >= prev.bytesOut) {
      var dt = now - prev.t;
      var r = { in: (obj.bytes_in - prev.bytesIn) / dt, out: (obj.bytes_out - prev.bytesOut) / dt };
      rates.set(key, r);
      return r;
    }
    if (prev && now === prev.t && rates.has(key)) return rates.get(key);
    var h = { in: null, out: null };
    if (historyEntry) h = { in: lastValue(historyEntry.bytes_in_rate), out: lastValue(historyEntry.bytes_out_rate) };
    rates.set(key, h);
    return h;
  }

  function sumRate(r) {
    if (r.in === null && r.out === null) return null;
    return (r.in || 0) + (r.out || 0);
  }

  // ---- status rendering -------------------------------------------------------------

  function serverTone(s) {
    if (s.admin_state === "maint") return "maint";
    if (s.op_state !== "UP") return "down";
    if (s.admin_state === "drain") return "drain";
    return "up";
  }

  function serverLabel(s) {
    var tone = serverTone(s);
    if (tone === "maint") return "MAINT";
    if (tone === "drain") return "DRAIN";
    if (tone === "down") return s.admin_state === "drain" ? "DOWN · DRAIN" : "DOWN";
    return "UP";
  }

  function renderStatus(st) {
    lastStatus = st;
    var now = st.now;

    // Header.
    setText($("meta-node"), st.node || "–");
    setText($("meta-version"), st.version || "–");
    setText($("meta-uptime"), st.started_at ? fmtDuration(now - st.started_at) : "–");
    var cfg = st.config || {};
    var cfgNode = $("meta-config");
    var lr = cfg.last_reload;
    if (!lr) {
      setText(cfgNode, "loaded at start");
      cfgNode.classList.remove("bad");
    } else {
      setText(cfgNode, (lr.ok ? "reloaded " : "reload failed ") + fmtAge(now - lr.at));
      cfgNode.classList.toggle("bad", !lr.ok);
    }
    setAttr(cfgNode, "title", (cfg.path || "") + (lr && lr.message ? " — " + lr.message : ""));

    var frontends = Array.isArray(st.frontends) ? st.frontends : [];
    var backends = Array.isArray(st.backends) ? st.backends : [];

    renderBanners(backends, lr);
    renderFrontends(frontends);
    renderBackends(backends, now);
    renderSummary(frontends, backends);
  }

  function renderBanners(backends, lastReload) {
    var wanted = new Map();
    backends.forEach(function (b) {
      if (!b.up)
        wanted.set("backend:" + b.name, {
          kind: "down",
          backend: b.name,
          text: "Backend " + b.name + " has no UP server",
        });
    });
    if (lastReload && !lastReload.ok) {
      wanted.set("reload", {
        kind: "warn",
        text: "Last configuration reload failed: " + (lastReload.message || "see the log"),
      });
    }
    bannerViews.forEach(function (node, key) {
      if (!wanted.has(key)) {
        node.remove();
        bannerViews.delete(key);
      }
    });
    var box = $("banners");
    wanted.forEach(function (b, key) {
      var node = bannerViews.get(key);
      if (!node) {
        node = el("div", { class: b.kind === "warn" ? "banner warn" : "banner", role: "alert", "data-banner": key });
        if (b.backend !== undefined) node.setAttribute("data-banner-backend", b.backend);
        box.appendChild(node);
        bannerViews.set(key, node);
      }
      setText(node, b.text);
    });
  }

  function renderSummary(frontends, backends) {
    var sessions = 0;
    frontends.forEach(function (f) {
      sessions += f.cur_sessions || 0;
    });
    var beUp = 0;
    var srvUp = 0;
    var srvAll = 0;
    var tput = null;
    backends.forEach(function (b) {
      if (b.up) beUp++;
      (b.servers || []).forEach(function (s) {
        if (s.retired) return;
        srvAll++;
        if (s.op_state === "UP") srvUp++;
      });
      var r = rates.get("b:" + b.name);
      var t = r ? sumRate(r) : null;
      if (t !== null) tput = (tput || 0) + t;
    });
    setText($("sum-frontends"), fmtInt(frontends.length));
    setText($("sum-backends"), beUp + " / " + backends.length);
    $("sum-backends").classList.toggle("bad", beUp < backends.length);
    setText($("sum-servers"), srvUp + " / " + srvAll);
    $("sum-servers").classList.toggle("bad", srvUp < srvAll);
    setText($("sum-sessions"), fmtInt(sessions));
    setText($("sum-throughput"), fmtBytesRate(tput));
  }

  /** Keep a container's children in the given order without touching nodes already in place. */
  function syncOrder(container, nodes, before) {
    var ref = before || null;
    for (var i = nodes.length - 1; i >= 0; i--) {
      var n = nodes[i];
      if (n.nextSibling !== ref || n.parentNode !== container) container.insertBefore(n, ref);
      ref = n;
    }
  }

  // Frontends table.

  function renderFrontends(frontends) {
    var body = $("frontends-body");
    var seen = new Set();
    var rows = [];
    frontends.forEach(function (f) {
      seen.add(f.name);
      var v = frontendViews.get(f.name);
      if (!v) {
        v = createFrontendRow(f);
        frontendViews.set(f.name, v);
      }
      updateFrontendRow(v, f);
      rows.push(v.row);
    });
    frontendViews.forEach(function (v, name) {
      if (!seen.has(name)) {
        destroyChart(v.spark);
        v.row.remove();
        frontendViews.delete(name);
      }
    });
    var empty = body.querySelector("tr.empty-row");
    if (!frontends.length && !empty) {
      body.appendChild(
        el("tr", { class: "empty-row" }, el("td", { class: "empty", colspan: "7", text: "No frontend." })),
      );
    } else if (frontends.length && empty) {
      empty.remove();
    }
    syncOrder(body, rows);
  }

  function createFrontendRow(f) {
    var v = {};
    v.name = el("span", { class: "name", text: f.name });
    v.mode = el("span", { class: "tag" });
    v.binds = el("span", { class: "mono" });
    v.backend = el("span");
    v.sessions = el("span");
    v.maxconn = el("span", { class: "sub" });
    v.rate = el("td", { class: "num" });
    v.total = el("td", { class: "num" });
    v.sparkBox = el("div", {
      class: "spark",
      role: "img",
      "aria-label": "Sessions of frontend " + f.name + " over the last 15 minutes",
    });
    v.row = el(
      "tr",
      { class: "frontend", "data-frontend": f.name },
      el("td", null, v.name, v.mode),
      el("td", null, v.binds),
      el("td", null, v.backend),
      el("td", { class: "num" }, v.sessions, v.maxconn),
      v.rate,
      v.total,
      el("td", null, v.sparkBox),
    );
    return v;
  }

  function updateFrontendRow(v, f) {
    setText(v.mode, f.mode || "tcp");
    setText(v.binds, (f.binds || []).join(", "));
    setText(v.backend, f.default_backend || "–");
    setText(v.sessions, fmtInt(f.cur_sessions || 0));
    setText(v.maxconn, f.maxconn ? "of " + fmtInt(f.maxconn) : "");
    setText(v.rate, fmtRate(f.session_rate));
    setText(v.total, fmtInt(f.total_sessions));
    if (!v.spark && v.row.isConnected) {
      v.spark = makeSpark(v.sparkBox, COLORS.sessions, COLORS.sessionsFill);
      updateFrontendSpark(v, f.name);
    }
  }

  // Backends cards.

  function renderBackends(backends, now) {
    var box = $("backends");
    var seen = new Set();
    var cards = [];
    backends.forEach(function (b) {
      seen.add(b.name);
      var v = backendViews.get(b.name);
      if (!v) {
        v = createBackendCard(b);
        backendViews.set(b.name, v);
        box.appendChild(v.card);
      }
      updateBackendCard(v, b, now);
      cards.push(v.card);
    });
    backendViews.forEach(function (v, name) {
      if (!seen.has(name)) destroyBackendCard(v, name);
    });
    syncOrder(box, cards);
  }

  function createBackendCard(b) {
    var v = { name: b.name, rows: new Map() };
    var titleId = "backend-title-" + ++cardSerial;
    v.pill = el("span", { class: "pill" });
    v.balance = el("span", { class: "tag" });
    v.usable = el("b", { "data-fact": "usable" });
    v.sessions = el("b", { "data-fact": "sessions" });
    v.queue = el("b", { "data-fact": "queue" });
    v.tin = el("b", { "data-fact": "bytes-in" });
    v.tout = el("b", { "data-fact": "bytes-out" });
    v.total = el("b", { "data-fact": "total" });
    var facts = el(
      "div",
      { class: "facts" },
      el("span", null, "Usable servers ", v.usable, " "),
      el("span", null, "Sessions ", v.sessions, " "),
      el("span", null, "Queue ", v.queue, " "),
      el("span", null, "In ", v.tin, " "),
      el("span", null, "Out ", v.tout, " "),
      el("span", null, "Total ", v.total),
    );
    var head = el(
      "div",
      { class: "panel-head" },
      el("h2", { id: titleId, text: "Backend " + b.name }),
      v.pill,
      v.balance,
      facts,
    );

    v.sessionsBox = el("div", {
      class: "chart-box",
      role: "img",
      "aria-label": "Sessions of backend " + b.name + " over the last 15 minutes",
    });
    v.tputBox = el("div", {
      class: "chart-box",
      role: "img",
      "aria-label": "Throughput of backend " + b.name + " over the last 15 minutes",
    });
    var chartsBox = el(
      "div",
      { class: "charts" },
      el("div", { class: "chart" }, el("h3", { text: "Sessions · last 15 min" }), v.sessionsBox),
      el("div", { class: "chart" }, el("h3", { text: "Throughput · last 15 min" }), v.tputBox),
    );

    v.tbody = el("tbody");
    var table = el(
      "table",
      { class: "grid servers", "aria-label": "Servers of backend " + b.name },
      el(
        "thead",
        null,
        el(
          "tr",
          null,
          el("th", { scope: "col", text: "Server" }),
          el("th", { scope: "col", text: "State" }),
          el("th", { scope: "col", class: "num", text: "Weight" }),
          el("th", { scope: "col", class: "num", text: "Sessions" }),
          el("th", { scope: "col", class: "num", text: "Throughput" }),
          el("th", { scope: "col", text: "Sessions · 15 min" }),
          el("th", { scope: "col", text: "Last check" }),
          el("th", { scope: "col", class: "num", text: "Actions" }),
        ),
      ),
      v.tbody,
    );
    v.card = el(
      "section",
      { class: "panel backend", "data-backend": b.name, "aria-labelledby": titleId },
      head,
      chartsBox,
      el("div", { class: "table-wrap" }, table),
    );
    return v;
  }

  function destroyBackendCard(v, name) {
    destroyChart(v.sessionsChart);
    destroyChart(v.tputChart);
    v.rows.forEach(function (r) {
      destroyChart(r.spark);
    });
    v.card.remove();
    backendViews.delete(name);
  }

  function updateBackendCard(v, b, now) {
    var servers = Array.isArray(b.servers) ? b.servers : [];
    setAttr(v.card, "data-up", b.up ? "true" : "false");
    setAttr(v.pill, "data-tone", b.up ? "up" : "down");
    setText(v.pill, b.up ? "UP" : "NO UP SERVER");
    setText(v.balance, b.balance || "");
    var live = servers.filter(function (s) {
      return !s.retired;
    }).length;
    setText(v.usable, fmtInt(b.usable_servers) + " / " + live);
    setText(v.sessions, fmtInt(b.cur_sessions));
    setText(v.queue, fmtInt(b.queue));
    setText(v.total, fmtInt(b.total_sessions));
    var hb = history && history.backends ? history.backends[b.name] : null;
    var r = rateOf("b:" + b.name, b, now, hb);
    setText(v.tin, fmtBytesRate(r.in));
    setText(v.tout, fmtBytesRate(r.out));

    var seen = new Set();
    var rows = [];
    servers.forEach(function (s) {
      seen.add(s.name);
      var rv = v.rows.get(s.name);
      if (!rv) {
        rv = createServerRow(b.name, s);
        v.rows.set(s.name, rv);
        v.tbody.appendChild(rv.row);
      }
      updateServerRow(rv, s, now);
      rows.push(rv.row);
    });
    v.rows.forEach(function (rv, name) {
      if (!seen.has(name)) {
        destroyChart(rv.spark);
        rv.row.remove();
        v.rows.delete(name);
      }
    });
    syncOrder(v.tbody, rows);

    if (!v.sessionsChart && v.card.isConnected) {
      v.sessionsChart = makeChart(
        v.sessionsBox,
        [{ label: "Sessions", stroke: COLORS.sessions, fill: COLORS.sessionsFill, value: valueInt }],
        { floor: 4, size: 44, values: fmtAxisInt, incrs: INT_INCRS },
      );
      v.tputChart = makeChart(
        v.tputBox,
        [
          { label: "In", stroke: COLORS.bytesIn, fill: COLORS.bytesInFill, value: valueBytesRate },
          { label: "Out", stroke: COLORS.bytesOut, fill: COLORS.bytesOutFill, value: valueBytesRate },
        ],
        { floor: 1000, size: 78, values: fmtAxisBytes },
      );
      updateBackendCharts(v);
    }
  }

  function createServerRow(backend, s) {
    var key = backend + "/" + s.name;
    var v = { key: key, backend: backend, server: s.name, buttons: {} };
    v.name = el("span", { class: "name", text: s.name });
    v.tags = el("span");
    v.address = el("span", { class: "sub mono" });
    v.pill = el("span", { class: "pill" });
    v.pillSub = el("span", { class: "sub" });
    v.weight = el("span");
    v.weightSub = el("span", { class: "sub" });
    v.sessions = el("span");
    v.sessionsSub = el("span", { class: "sub" });
    v.tput = el("span", { class: "tput" });
    v.tputSub = el("span", { class: "sub" });
    // mode dicom: what the associations carried (DIMSE requests and final response statuses).
    v.dimse = el("span", { class: "sub dimse" });
    v.sparkBox = el("div", {
      class: "spark",
      role: "img",
      "aria-label": "Sessions of server " + key + " over the last 15 minutes",
    });
    v.checkText = el("span", { class: "check-text" });
    v.checkAge = el("span", { class: "check-age" });
    v.check = el("div", { class: "check" }, v.checkText, v.checkAge);
    var actions = el("div", { class: "actions" });
    ["drain", "maint", "ready"].forEach(function (action) {
      var btn = el("button", {
        type: "button",
        class: "btn btn-sm",
        "data-action": action,
        "aria-label": ACTIONS[action].label + " server " + key,
        text: ACTIONS[action].label,
      });
      v.buttons[action] = btn;
      actions.appendChild(btn);
    });
    v.row = el(
      "tr",
      { class: "server", "data-server": key },
      el("td", null, v.name, v.tags, v.address),
      el("td", null, v.pill, v.pillSub),
      el("td", { class: "num" }, v.weight, v.weightSub),
      el("td", { class: "num" }, v.sessions, v.sessionsSub),
      el("td", { class: "num" }, v.tput, v.tputSub, v.dimse),
      el("td", null, v.sparkBox),
      el("td", null, v.check),
      el("td", null, actions),
    );
    return v;
  }

  // "C-STORE 1,200 · C-ECHO 3 · ok 1,203 · warn 1 · fail 0" from a server's DIMSE counters, or "".
  function dimseText(d) {
    if (!d || !d.requests) return "";
    var parts = Object.keys(d.requests)
      .sort()
      .map(function (k) {
        return k.replace(/-RQ$/, "") + " " + fmtInt(d.requests[k]);
      });
    if (!parts.length) return "";
    var r = d.responses || {};
    parts.push("ok " + fmtInt(r.success || 0));
    if (r.warning) parts.push("warn " + fmtInt(r.warning));
    parts.push("fail " + fmtInt(r.failure || 0));
    return parts.join(" · ");
  }

  // "ADT^A01 1,200 · AA 1,198 · AR 2" from a server's HL7 counters, or "".
  function hl7Text(h) {
    if (!h || !h.messages) return "";
    var parts = Object.keys(h.messages)
      .sort()
      .map(function (k) {
        return k.split("^").slice(0, 2).join("^") + " " + fmtInt(h.messages[k]);
      });
    Object.keys(h.acks || {})
      .sort()
      .forEach(function (code) {
        parts.push(code + " " + fmtInt(h.acks[code]));
      });
    return parts.join(" · ");
  }

  function updateServerRow(v, s, now) {
    v.current = s;
    var tone = serverTone(s);
    setAttr(v.row, "data-tone", tone);
    setAttr(v.row, "data-op-state", s.op_state);
    setAttr(v.row, "data-admin-state", s.admin_state);
    setAttr(v.row, "data-state", s.op_state + "/" + s.admin_state);
    setAttr(v.pill, "data-tone", tone);
    setText(v.pill, serverLabel(s));
    setText(v.pillSub, s.last_change ? "since " + fmtAge(now - s.last_change).replace(" ago", "") : "");
    setAttr(
      v.pill,
      "title",
      "health " + s.op_state + ", admin " + s.admin_state + (s.admin_source ? " (set by " + s.admin_source + ")" : ""),
    );

    var tags = [];
    if (s.backup) tags.push("backup");
    if (s.retired) tags.push("retired");
    if (v.tags.childNodes.length !== tags.length || v.tags.textContent !== tags.join("")) {
      v.tags.textContent = "";
      tags.forEach(function (t) {
        v.tags.appendChild(el("span", { class: "tag", text: t }));
      });
    }
    setText(v.address, s.address || "");

    // Weight: the configured one, and the effective one when slowstart or an agent changes it.
    setText(v.weight, fmtInt(s.weight));
    var eff = typeof s.effective_weight === "number" ? s.effective_weight : s.weight;
    setText(v.weightSub, eff !== s.weight ? "effective " + Math.round(eff * 100) / 100 : "");

    setText(v.sessions, fmtInt(s.cur_sessions));
    setText(v.sessionsSub, (s.maxconn ? "max " + fmtInt(s.maxconn) + " · " : "") + "total " + fmtInt(s.total_sessions));

    var hs = history && history.servers ? history.servers[v.key] : null;
    var r = rateOf("s:" + v.key, s, now, hs);
    setText(v.tput, fmtBytesRate(sumRate(r)));
    setText(
      v.tputSub,
      r.in === null && r.out === null ? "" : "in " + fmtBytesRate(r.in) + " · out " + fmtBytesRate(r.out),
    );

    setText(v.dimse, dimseText(s.dimse) || hl7Text(s.hl7));

    var c = s.last_check;
    if (!c) {
      setAttr(v.check, "data-ok", "none");
      setText(v.checkText, s.admin_state === "maint" ? "checks stopped" : "no check yet");
      setText(v.checkAge, "");
      v.check.removeAttribute("title");
    } else {
      setAttr(v.check, "data-ok", c.ok ? "true" : "false");
      setText(v.checkText, (c.ok ? "✓ " : "✗ ") + (c.text || (c.ok ? "ok" : "failed")));
      var dur = typeof c.duration_ms === "number" ? " · " + c.duration_ms.toFixed(1) + " ms" : "";
      setText(v.checkAge, (s.admin_state === "maint" ? "checks stopped · last " : "") + fmtAge(now - c.at) + dur);
      setAttr(v.check, "title", c.text || "");
    }

    var pending = !!v.pending;
    Object.keys(v.buttons).forEach(function (action) {
      var btn = v.buttons[action];
      var disabled = pending || s.retired || s.admin_state === ACTIONS[action].state;
      if (btn.disabled !== disabled) btn.disabled = disabled;
    });

    if (!v.spark && v.row.isConnected) {
      v.spark = makeSpark(v.sparkBox, COLORS.sessions, COLORS.sessionsFill);
      updateServerSpark(v);
    }
  }

  // ---- actions -------------------------------------------------------------------

  function findServerView(key) {
    var found = null;
    backendViews.forEach(function (bv) {
      bv.rows.forEach(function (rv) {
        if (rv.key === key) found = rv;
      });
    });
    return found;
  }

  function onBackendsClick(ev) {
    var btn = ev.target.closest("button[data-action]");
    if (!btn || btn.disabled) return;
    var row = btn.closest("tr[data-server]");
    var v = row && findServerView(row.getAttribute("data-server"));
    var action = ACTIONS[btn.getAttribute("data-action")];
    if (!v || !action) return;
    confirmDialog(
      btn.getAttribute("data-action"),
      action.title + " " + v.key + "?",
      action.label + " " + action.text,
      action.label + " " + v.server,
    ).then(function (ok) {
      if (ok) setAdminState(v, action);
      else btn.focus();
    });
  }

  function setAdminState(v, action) {
    var gen = generation;
    v.pending = true;
    if (v.current) updateServerRow(v, v.current, lastStatus ? lastStatus.now : 0);
    var path = "/api/v1/backends/" + encodeURIComponent(v.backend) + "/servers/" + encodeURIComponent(v.server);
    api("PATCH", path, { admin_state: action.state })
      .then(function (r) {
        if (gen !== generation) return;
        if (r.status === 401) {
          showLogin("Your session has ended. Sign in again.");
          return;
        }
        if (r.ok) {
          toast("Server " + v.key + " " + action.done + ".", "info");
          if (r.data && r.data.name === v.server && r.data.admin_state) {
            v.current = r.data;
          }
        } else {
          toast("Could not change " + v.key + ": " + errorText(r), "error");
        }
      })
      .catch(function () {
        toast("Could not change " + v.key + ": the admin server did not answer.", "error");
      })
      .finally(function () {
        v.pending = false;
        if (gen !== generation) return;
        if (v.current) updateServerRow(v, v.current, lastStatus ? lastStatus.now : 0);
        refreshNow();
      });
  }

  var dialogResolve = null;

  /** An in-page confirmation (a modal <dialog>); resolves true when confirmed. */
  function confirmDialog(action, title, text, okLabel) {
    var dialog = $("confirm-dialog");
    if (dialog.open) dialog.close("cancel");
    setAttr(dialog, "data-action", action);
    setText($("confirm-title"), title);
    setText($("confirm-text"), text);
    setText($("confirm-ok"), okLabel);
    dialog.returnValue = "";
    return new Promise(function (resolve) {
      dialogResolve = resolve;
      dialog.showModal();
    });
  }

  function onDialogClose() {
    var dialog = $("confirm-dialog");
    var resolve = dialogResolve;
    dialogResolve = null;
    if (resolve) resolve(dialog.returnValue === "ok");
  }

  // ---- charts --------------------------------------------------------------------

  function hasUPlot() {
    return typeof window.uPlot === "function";
  }

  function valueInt(u, v) {
    return v === null || v === undefined ? "–" : fmtInt(v);
  }

  function valueBytesRate(u, v) {
    return fmtBytesRate(v);
  }

  function fmtAxisInt(u, splits) {
    return splits.map(function (v) {
      return Number.isInteger(v) ? fmtInt(v) : "";
    });
  }

  function fmtAxisBytes(u, splits) {
    return splits.map(function (v) {
      return fmtBytesRate(v);
    });
  }

  function xRange() {
    var end =
      history && history.t && history.t.length
        ? history.t[history.t.length - 1]
        : lastStatus
          ? lastStatus.now
          : Date.now() / 1000;
    var win = (history && history.window_s) || WINDOW_S;
    return [end - win, end];
  }

  /** A y range from 0 with some headroom, never smaller than [0, floor]. */
  function yRangeFromZero(floor) {
    return function (u, min, max) {
      var top = max === null || max === undefined || isNaN(max) ? 0 : max * 1.15;
      return [0, Math.max(floor, top)];
    };
  }

  function fmtAxisTime(u, splits) {
    return splits.map(function (v) {
      return new Date(v * 1000).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
    });
  }

  var INT_INCRS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000, 1e6, 1e7];

  /**
   * Draw points (not only lines) when a series has too few values for a line
   * to be seen: right after start, or for a server that appeared a moment ago.
   */
  function pointsShow(u, si) {
    var ys = u.data[si] || [];
    var xs = u.data[0] || [];
    var n = 0;
    for (var i = 0; i < ys.length && n <= 3; i++) if (ys[i] !== null && ys[i] !== undefined) n++;
    if (n <= 3) return true;
    var span = Math.abs(u.valToPos(xs[xs.length - 1], "x") - u.valToPos(xs[0], "x"));
    return xs.length * 8 <= span;
  }

  function boxWidth(box) {
    return Math.max(120, Math.floor(box.clientWidth || box.getBoundingClientRect().width || 300));
  }

  function makeChart(box, series, y) {
    if (!hasUPlot()) return null;
    var opts = {
      width: boxWidth(box),
      height: 170,
      padding: [8, 8, 0, 0],
      cursor: { drag: { x: false, y: false }, points: { size: 6 } },
      legend: { live: true },
      scales: { x: { time: true, range: xRange }, y: { range: yRangeFromZero(y.floor) } },
      axes: [
        {
          stroke: COLORS.axis,
          values: fmtAxisTime,
          space: 60,
          grid: { stroke: COLORS.grid, width: 1 },
          ticks: { stroke: COLORS.grid, width: 1 },
        },
        {
          stroke: COLORS.axis,
          size: y.size,
          values: y.values,
          incrs: y.incrs,
          grid: { stroke: COLORS.grid, width: 1 },
          ticks: { stroke: COLORS.grid, width: 1 },
        },
      ],
      series: [{ label: "Time", value: "{HH}:{mm}:{ss}" }].concat(
        series.map(function (s) {
          return {
            label: s.label,
            stroke: s.stroke,
            fill: s.fill,
            width: 1.6,
            value: s.value,
            spanGaps: false,
            points: { show: pointsShow, size: 5, fill: s.stroke },
          };
        }),
      ),
    };
    var empty = [[]].concat(
      series.map(function () {
        return [];
      }),
    );
    var u = new window.uPlot(opts, empty, box);
    observe(box, u, 170);
    return u;
  }

  function makeSpark(box, stroke, fill) {
    if (!hasUPlot()) return null;
    var opts = {
      width: 140,
      height: 32,
      pxAlign: false,
      padding: [3, 1, 1, 1],
      cursor: { show: false },
      select: { show: false },
      legend: { show: false },
      scales: { x: { time: false, range: xRange }, y: { range: yRangeFromZero(1) } },
      axes: [{ show: false }, { show: false }],
      series: [{}, { stroke: stroke, fill: fill, width: 1.4, points: { show: pointsShow, size: 3, fill: stroke } }],
    };
    var u = new window.uPlot(opts, [[], []], box);
    charts.add(u);
    return u;
  }

  function observe(box, u, height) {
    charts.add(u);
    u._medlbBox = box;
    u._medlbHeight = height;
    if (resizeObserver) resizeObserver.observe(box);
  }

  function onResize(entries) {
    entries.forEach(function (entry) {
      charts.forEach(function (u) {
        if (u._medlbBox === entry.target) {
          var w = boxWidth(entry.target);
          if (w !== u.width) u.setSize({ width: w, height: u._medlbHeight });
        }
      });
    });
  }

  function destroyChart(u) {
    if (!u) return;
    if (resizeObserver && u._medlbBox) resizeObserver.unobserve(u._medlbBox);
    charts.delete(u);
    u.destroy();
  }

  function seriesOrNulls(arr, n) {
    if (Array.isArray(arr) && arr.length === n) return arr;
    var out = new Array(n);
    for (var i = 0; i < n; i++) out[i] = Array.isArray(arr) && i < arr.length ? arr[i] : null;
    return out;
  }

  function updateBackendCharts(v) {
    if (!history || !v.sessionsChart) return;
    var t = history.t;
    var h = (history.backends || {})[v.name] || {};
    v.sessionsChart.setData([t, seriesOrNulls(h.cur_sessions, t.length)]);
    v.tputChart.setData([t, seriesOrNulls(h.bytes_in_rate, t.length), seriesOrNulls(h.bytes_out_rate, t.length)]);
  }

  function updateServerSpark(v) {
    if (!history || !v.spark) return;
    var t = history.t;
    var h = (history.servers || {})[v.key] || {};
    v.spark.setData([t, seriesOrNulls(h.cur_sessions, t.length)]);
  }

  function updateFrontendSpark(v, name) {
    if (!history || !v.spark) return;
    var t = history.t;
    var h = (history.frontends || {})[name] || {};
    v.spark.setData([t, seriesOrNulls(h.cur_sessions, t.length)]);
  }

  function renderHistory() {
    backendViews.forEach(function (v) {
      updateBackendCharts(v);
      v.rows.forEach(updateServerSpark);
    });
    frontendViews.forEach(function (v, name) {
      updateFrontendSpark(v, name);
    });
  }

  // ---- teardown --------------------------------------------------------------------

  function clearData() {
    backendViews.forEach(function (v, name) {
      destroyBackendCard(v, name);
    });
    frontendViews.forEach(function (v) {
      destroyChart(v.spark);
      v.row.remove();
    });
    frontendViews.clear();
    bannerViews.forEach(function (node) {
      node.remove();
    });
    bannerViews.clear();
    $("frontends-body").textContent = "";
    [
      "sum-frontends",
      "sum-backends",
      "sum-servers",
      "sum-sessions",
      "sum-throughput",
      "meta-node",
      "meta-version",
      "meta-uptime",
      "meta-config",
    ].forEach(function (id) {
      setText($(id), "–");
    });
    lastStatus = null;
    history = null;
    counters.clear();
    rates.clear();
  }

  // ---- boot ------------------------------------------------------------------------

  function boot() {
    $("login-form").addEventListener("submit", onLoginSubmit);
    $("logout").addEventListener("click", onLogout);
    $("backends").addEventListener("click", onBackendsClick);
    $("confirm-dialog").addEventListener("close", onDialogClose);
    api("GET", "/api/v1/session").then(
      function (r) {
        if (r.ok && r.data && r.data.authenticated) showDashboard();
        else showLogin("");
      },
      function () {
        showLogin("Cannot reach the medlb admin server.");
      },
    );
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", boot);
  else boot();
})();
