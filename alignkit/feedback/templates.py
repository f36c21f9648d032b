"""Server-rendered pages (Jinja2, autoescape on: every value from data or users is escaped as text).

The one stylesheet and the one script are inline and allowed by their sha256 in the
Content-Security-Policy, so no other script (an injected one included) can run.
"""

from __future__ import annotations

import base64
import hashlib

CSS = """
body{font-family:system-ui,sans-serif;margin:0 auto;max-width:960px;padding:0 1em;color:#222}
header{display:flex;justify-content:space-between;align-items:center;border-bottom:1px solid #ccc;margin-bottom:1em}
.prompt,.card .text{white-space:pre-wrap;word-break:break-word}
.prompt{background:#f3f3f3;padding:.8em;border-radius:6px}
ol#ranking{list-style:none;padding:0}
.card{border:2px solid #bbb;border-radius:6px;padding:.6em;margin:.5em 0;background:#fff;cursor:grab}
.card:focus{outline:none;border-color:#1a66d9;box-shadow:0 0 0 3px #c6dbff}
.card.tie{margin-top:-.3em;border-top-style:dashed}
.rank{font-weight:bold;margin-right:.5em}.letter{color:#666}
.controls{font-size:.9em;color:#444;margin-top:.4em}.controls label{margin-right:1em}
.error{background:#fde2e2;border:1px solid #d33;padding:.6em;border-radius:6px}
.ok{background:#e2f5e2;border:1px solid #3a3;padding:.6em;border-radius:6px}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.2em .5em;text-align:right}
th:first-child,td:first-child{text-align:left}
kbd{border:1px solid #aaa;border-radius:3px;padding:0 .3em;font-size:.85em}
.help{font-size:.85em;color:#444}.hidden{display:none}
"""

JS = """
(function () {
  var list = document.getElementById('ranking'), field = document.getElementById('ranking-field');
  var form = document.getElementById('label-form');
  if (!list) return;
  function cards() { return Array.prototype.slice.call(list.querySelectorAll('li.card')); }
  function sync() {
    var levels = [];
    cards().forEach(function (c, i) {
      if (i === 0) c.dataset.tie = '0';
      var p = parseInt(c.dataset.pos, 10);
      if (c.dataset.tie === '1') levels[levels.length - 1].push(p); else levels.push([p]);
      c.classList.toggle('tie', c.dataset.tie === '1');
      c.querySelector('.rank').textContent = (c.dataset.tie === '1' ? '= ' : '') + levels.length + '.';
    });
    field.value = JSON.stringify(levels.map(function (l) { return l.length === 1 ? l[0] : l; }));
  }
  function current() { var a = document.activeElement; return a && a.classList.contains('card') ? a : null; }
  function move(card, to) {
    var all = cards(); to = Math.max(0, Math.min(all.length - 1, to));
    card.dataset.tie = '0'; list.removeChild(card);
    var rest = cards(); list.insertBefore(card, rest[to] || null); sync(); card.focus();
  }
  function toggleFlag(card, kind) { var b = card.querySelector('input[value="' + kind + '"]'); b.checked = !b.checked; }
  document.addEventListener('keydown', function (e) {
    var tag = (e.target.tagName || '').toLowerCase();
    if (tag === 'textarea' || tag === 'select' || (tag === 'input' && e.target.type !== 'checkbox')) {
      if (e.key === 'Enter' && e.ctrlKey) { e.preventDefault(); form.requestSubmit(); }
      return;
    }
    var card = current(), all = cards(), i = card ? all.indexOf(card) : -1, k = e.key;
    if (k === 'Enter') { e.preventDefault(); form.requestSubmit(); return; }
    if (k === 's') { e.preventDefault(); form.requestSubmit(document.getElementById('skip')); return; }
    if (k === '?') { document.getElementById('help').classList.toggle('hidden'); return; }
    if (!card) { if (all.length && /^(ArrowDown|ArrowUp|j|k)$/.test(k)) { all[0].focus(); e.preventDefault(); } return; }
    if ((k === 'ArrowUp' && e.shiftKey) || k === 'K') move(card, i - 1);
    else if ((k === 'ArrowDown' && e.shiftKey) || k === 'J') move(card, i + 1);
    else if (k === 'ArrowUp' || k === 'k') { if (i > 0) all[i - 1].focus(); }
    else if (k === 'ArrowDown' || k === 'j') { if (i < all.length - 1) all[i + 1].focus(); }
    else if (/^[1-9]$/.test(k)) move(card, parseInt(k, 10) - 1);
    else if (k === 't') { card.dataset.tie = card.dataset.tie === '1' ? '0' : '1'; sync(); }
    else if (k === 'u') toggleFlag(card, 'unsafe');
    else if (k === 'n') toggleFlag(card, 'nonsense');
    else return;
    e.preventDefault();
  });
  var dragged = null;
  list.addEventListener('dragstart', function (e) { dragged = e.target.closest('li.card'); });
  list.addEventListener('dragover', function (e) {
    var over = e.target.closest('li.card'); e.preventDefault();
    if (!dragged || !over || over === dragged) return;
    var box = over.getBoundingClientRect(); dragged.dataset.tie = '0';
    list.insertBefore(dragged, e.clientY < box.top + box.height / 2 ? over : over.nextSibling);
  });
  list.addEventListener('drop', function (e) { e.preventDefault(); sync(); });
  list.addEventListener('dragend', function () { dragged = null; sync(); });
  sync();
  if (cards().length) cards()[0].focus();
})();
"""


def _sha256(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


CSP = (f"default-src 'none'; script-src {_sha256(JS)}; style-src {_sha256(CSS)}; form-action 'self'; "
       "frame-ancestors 'none'; base-uri 'none'")

BASE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{% block title %}alignkit label{% endblock %}</title><style>{{ css|safe }}</style></head><body>
<header><h3>alignkit label</h3>{% if user %}<form method="post" action="/logout">
<input type="hidden" name="csrf" value="{{ csrf }}">{{ user.name }}{% if user.is_admin %} (admin) <a href="/admin">admin</a>
<a href="/label">label</a>{% endif %} <button type="submit">Sign out</button></form>{% endif %}</header>
{% if error %}<p class="error" role="alert">{{ error }}</p>{% endif %}
{% block body %}{% endblock %}
{% block script %}{% endblock %}
</body></html>"""

LOGIN = """{% extends "base" %}{% block body %}
<form method="post" action="/login"><input type="hidden" name="csrf" value="{{ csrf }}">
<label>Token <input type="password" name="token" id="token" autofocus autocomplete="off" required></label>
<button type="submit">Sign in</button></form>{% endblock %}"""

DONE = """{% extends "base" %}{% block body %}<p class="ok">Nothing left for you to label. Thank you!</p>{% endblock %}"""

LABEL = """{% extends "base" %}{% block body %}
<h4>Prompt <span class="letter">{{ item.prompt_id }}</span></h4>
{% if item.get('messages') %}{% for m in item.messages %}<div class="prompt"><b>{{ m.role }}:</b> {{ m.content }}</div>{% endfor %}
{% else %}<div class="prompt" id="prompt">{{ item.prompt }}</div>{% endif %}
<form method="post" action="/label" id="label-form">
<input type="hidden" name="csrf" value="{{ csrf }}">
<input type="hidden" name="assignment_id" value="{{ item.assignment_id }}">
<input type="hidden" name="ranking" id="ranking-field" value="{{ default_ranking }}">
<p class="help">Best first. Drag, or select with <kbd>↑</kbd><kbd>↓</kbd> and move with <kbd>Shift</kbd>+<kbd>↑</kbd><kbd>↓</kbd>
or <kbd>1</kbd>-<kbd>9</kbd>; <kbd>t</kbd> ties with the one above; <kbd>Enter</kbd> submits, <kbd>s</kbd> skips;
<kbd>?</kbd> more.</p>
<div id="help" class="help hidden"><kbd>j</kbd>/<kbd>k</kbd> select next/previous, <kbd>J</kbd>/<kbd>K</kbd> move down/up,
<kbd>u</kbd> flag unsafe, <kbd>n</kbd> flag nonsense, <kbd>Ctrl</kbd>+<kbd>Enter</kbd> submits from the note.</div>
<ol id="ranking">{% for text in item.shown %}{% set pos = loop.index0 %}
<li class="card" tabindex="0" draggable="true" data-pos="{{ pos }}" data-tie="0" id="card-{{ pos }}">
<span class="rank">{{ loop.index }}.</span><span class="letter">[{{ letters[pos] }}]</span>
<div class="text">{{ text }}</div>
<div class="controls">{% for dim in dims %}<label>{{ dim }} <select name="{{ dim }}_{{ pos }}"><option value="">–</option>
{% for v in scale %}<option value="{{ v }}">{{ v }}</option>{% endfor %}</select></label>{% endfor %}
{% for flag in flag_kinds %}<label><input type="checkbox" name="flag_{{ pos }}" value="{{ flag }}"> {{ flag }}</label>{% endfor %}
</div></li>{% endfor %}</ol>
<label>Note (optional)<br><textarea name="note" rows="2" cols="80" maxlength="{{ max_note }}"></textarea></label><br>
<button type="submit" id="submit">Submit (Enter)</button>
<button type="submit" id="skip" formaction="/skip" formnovalidate>Skip (s)</button>
</form>{% endblock %}
{% block script %}<script>{{ js|safe }}</script>{% endblock %}"""

ADMIN = """{% extends "base" %}{% block body %}
{% if new_token %}<p class="ok">Token for <b>{{ new_name }}</b> (shown once): <code id="new-token">{{ new_token }}</code></p>{% endif %}
<p>{{ p.labels }} labels; {{ p.complete_prompts }} of {{ p.n_prompts }} prompts have {{ p.per_prompt }} labels.
Pairwise agreement: <b>{{ fmt(p.agreement) }}</b> over {{ p.comparisons }} comparisons;
Krippendorff's alpha (ordinal): <b>{{ fmt(p.alpha) }}</b>.</p>
<p>Export: <a href="/admin/export?format=rankings" id="export-rankings">rankings.jsonl</a> ·
<a href="/admin/export?format=pairs" id="export-pairs">pairs.jsonl</a></p>
<form method="post" action="/admin/labelers"><input type="hidden" name="csrf" value="{{ csrf }}">
<label>New labeler <input name="name" maxlength="100" required></label>
<label><input type="checkbox" name="admin" value="1"> admin</label> <button type="submit">Create</button></form>
<h4>Labelers</h4><table><tr><th>name</th><th>done</th><th>skipped</th><th>open</th><th>agreement with others</th></tr>
{% for l in p.labelers %}<tr><td>{{ l.name }}{% if l.admin %} (admin){% endif %}</td><td>{{ l.done }}</td><td>{{ l.skipped }}</td>
<td>{{ l.open }}</td><td>{{ fmt(l.agreement) }}</td></tr>{% endfor %}</table>
<h4>Prompts{% if p.prompts|length < p.n_prompts %} (first {{ p.prompts|length }} of {{ p.n_prompts }}){% endif %}</h4>
<table><tr><th>prompt_id</th><th>done</th><th>skipped</th><th>open</th></tr>
{% for q in p.prompts %}<tr><td>{{ q.prompt_id }}</td><td>{{ q.done }}</td><td>{{ q.skipped }}</td><td>{{ q.open }}</td></tr>
{% endfor %}</table>{% endblock %}"""

MESSAGE = """{% extends "base" %}{% block body %}<p>{{ message }}</p>{% endblock %}"""


def environment():
    """The Jinja2 environment (imported lazily: jinja2 is a `label` extra)."""
    from jinja2 import DictLoader, Environment, StrictUndefined

    env = Environment(loader=DictLoader({"base": BASE, "login": LOGIN, "done": DONE, "label": LABEL,
                                         "admin": ADMIN, "message": MESSAGE}),
                      autoescape=True, undefined=StrictUndefined)
    env.globals.update(css=CSS, js=JS, fmt=lambda x: "–" if x is None or x != x else f"{x:.3f}")
    return env
