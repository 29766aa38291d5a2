"""An ipywidgets panel bound to a LiveModel: type or upload an input, Run, see the rendered Result.

    panel = truss_lab.widget(tr)     # or %truss widget

The model runs on a background thread, so the kernel keeps handling widget messages while it works;
the panel is updated when the run ends. The status line follows the watcher: a reload (or a failed
one, with its error) shows up without re-running the cell. Errors inside the panel's own callbacks
are shown in the panel, never lost in the kernel log.
"""

from __future__ import annotations

import ast
import base64
import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import ipywidgets as W

from ..display import render
from ..display.style import STYLE, esc
from ..wrapper import ENDPOINTS

HISTORY = 20  # runs kept in the history list
IMAGE_HINTS = ("image", "img", "url", "path", "file", "photo", "picture")


@dataclass
class Run:
    when: float
    result: Any  # a Result

    @property
    def label(self) -> str:
        t = self.result.trace
        status = "ok" if self.result.ok else f"{self.result.error.stage} error"
        return f"{time.strftime('%H:%M:%S', time.localtime(self.when))}  v{t.version}  {t.total_ms:.1f} ms  {status}"


class Panel:
    """The widget panel for one LiveModel. Display it (it is its own `_repr_mimebundle_`)."""

    def __init__(self, live):
        self.live = live
        self.chain: Any = None  # the Truss Chain whose entrypoint `live` is (widget(chain))
        self.runs: list[Run] = []
        self._upload: tuple[str, bytes] | None = None  # (file name, bytes) when the input is an upload
        self._busy = threading.Lock()
        self._idle = threading.Event()
        self._idle.set()
        self._showing_history = False

        self.status = W.HTML(layout=W.Layout(width="100%"))
        self.status.add_class("tl-status")
        self.text = W.Textarea(
            placeholder="model input: JSON or a Python literal",
            layout=W.Layout(width="100%", height="90px"),
        )
        self.text.add_class("tl-input")
        names = list(live.examples)
        self.examples = W.Dropdown(
            options=[("— example —", "")] + [(n, n) for n in names],
            value="",
            description="",
            layout=W.Layout(width="200px"),
            disabled=not names,
        )
        self.examples.add_class("tl-examples")
        self.upload = W.FileUpload(accept="image/*", multiple=False, description="Image")
        self.upload.add_class("tl-upload")
        self.upload_note = W.HTML()
        self.upload_note.add_class("tl-upload-note")
        self.method = W.Dropdown(options=["predict"], value="predict", description="method",
                                 layout=W.Layout(width="260px"))
        self.method.add_class("tl-method")
        self._set_methods()
        self.run_button = W.Button(description="Run", button_style="primary", icon="play")
        self.run_button.add_class("tl-run")
        self.run_n_button = W.Button(description="Run ×N", icon="forward")
        self.run_n_button.add_class("tl-run-n")
        self.profile_button = W.Button(description="Profile", icon="search",
                                       tooltip="profile N requests of this input: where inside each stage the time goes")
        self.profile_button.add_class("tl-profile")
        self.check_button = W.Button(description="Check", icon="check",
                                     tooltip="run the examples on the real Truss server too, compare, and lint for deploy")
        self.check_button.add_class("tl-check")
        self.n = W.BoundedIntText(value=20, min=1, max=10_000, description="N", layout=W.Layout(width="140px"))
        self.workers = W.IntSlider(value=4, min=1, max=32, description="workers", layout=W.Layout(width="260px"))
        self.progress = W.IntProgress(value=0, min=0, max=1, layout=W.Layout(width="160px", visibility="hidden"))
        self.output = W.HTML()
        self.output.add_class("tl-output")
        self.examples_toggle = W.Checkbox(value=False, description="re-run examples on save", indent=False,
                                          disabled=not live.bundle.examples, layout=W.Layout(width="220px"))
        self.examples_toggle.add_class("tl-examples-toggle")
        self.examples_diff = W.HTML()
        self.examples_diff.add_class("tl-examples-diff")
        self._examples_unsubscribe: Callable[[], None] | None = None
        self._examples_lock = threading.Lock()
        self.timeline = W.HTML()
        self.timeline.add_class("tl-timeline")
        self.history = W.Select(options=[], rows=5, layout=W.Layout(width="100%"))
        self.history.add_class("tl-history")

        self.examples.observe(self._guarded(self._on_example), names="value")
        self.upload.observe(self._guarded(self._on_upload), names="value")
        self.text.observe(self._guarded(self._on_text), names="value")
        self.history.observe(self._guarded(self._on_history), names="value")
        self.method.observe(self._guarded(self._on_method), names="value")
        self.examples_toggle.observe(self._guarded(self._on_examples_toggle), names="value")
        self.run_button.on_click(self._guarded(lambda _: self._start(self._run_once)))
        self.run_n_button.on_click(self._guarded(lambda _: self._start(self._run_many)))
        self.check_button.on_click(self._guarded(lambda _: self._start(self._check, needs_input=False)))
        self.profile_button.on_click(self._guarded(lambda _: self._start(self._profile)))
        self._unsubscribe = live.on_reload(self._guarded(self._reloaded))
        live.on_close(self._model_closed)

        self.box = W.VBox(
            [
                self.status,
                W.HBox([W.VBox([self.text], layout=W.Layout(flex="1")), W.VBox([self.examples, self.upload, self.upload_note])]),
                W.HBox([self.method, self.run_button, self.run_n_button, self.n, self.workers, self.profile_button,
                        self.check_button, self.progress]),
                self.examples_toggle,
                self.output,
                self.examples_diff,
                self.timeline,
                W.HTML("<b>history</b> <span style='color:#666'>(click a run to show it again)</span>"),
                self.history,
            ],
            layout=W.Layout(width="100%", max_width="980px"),
        )
        self.box.add_class("truss-lab-panel")
        if names:
            self.examples.value = names[0]  # start from something runnable
        self._show_status(None)

    def _reloaded(self, event) -> None:
        if event.ok:  # examples.yaml may have changed: the dropdown lists what is there now
            self._refresh_examples()
        self._show_status(event)

    def _refresh_examples(self) -> None:
        names = list(self.live.examples)
        options = [("— example —", "")] + [(n, n) for n in names]
        if list(self.examples.options) != options:
            keep = self.examples.value if self.examples.value in names else ""
            self.examples.options = options
            self.examples.value = keep
            self.examples.disabled = not names
            self.examples_toggle.disabled = not names

    # ------------------------------------------------------------------ display

    def _repr_mimebundle_(self, include=None, exclude=None):
        return self.box._repr_mimebundle_(include=include, exclude=exclude)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the current Run / Run ×N has finished (True), or `timeout` seconds pass (False)."""
        return self._idle.wait(timeout)

    def close(self) -> None:
        """Stop following reloads and close the widgets."""
        self._unsubscribe()
        self.box.close()

    def _model_closed(self) -> None:
        """The model was closed (replaced by `%truss load`, say): let go of it and say so in the panel."""
        self._unsubscribe()
        name = self.live.name
        self.live = _Closed(name)
        for button in (self.run_button, self.run_n_button, self.profile_button, self.check_button, self.examples_toggle):
            button.disabled = True
        self.status.value = (
            f"<b>{esc(name)}</b> <span style='color:#c62828'>closed</span> — "
            f"run <code>%truss widget</code> for the model loaded now"
        )

    # ------------------------------------------------------------------ input

    def model_input(self) -> Any:
        """What Run sends: the uploaded image (shaped like the examples' inputs) or the parsed text."""
        if self._upload is not None:
            return shape_like_examples(self._upload[1], self._upload[0], list(self.live.examples.values()))
        return parse_input(self.text.value)

    def _on_example(self, change) -> None:
        name = change["new"]
        if not name:
            return
        value = self.live.example(name)
        self._set_text(to_text(value))

    def _on_upload(self, change) -> None:
        files = change["new"]
        if not files:
            return
        item = files[0]
        name, data = item["name"], bytes(item["content"])
        self._upload = (name, data)
        self.upload_note.value = (
            f"<span class='tl-muted'>input: <b>{esc(name)}</b> ({len(data) / 1024:.1f} kB) — "
            "edit the text to use it instead</span>"
        )

    def _on_text(self, change) -> None:
        if not getattr(self, "_setting_text", False):
            self._clear_upload()

    def _set_text(self, text: str) -> None:
        self._setting_text = True
        try:
            self.text.value = text
        finally:
            self._setting_text = False
        self._clear_upload()

    def _clear_upload(self) -> None:
        if self._upload is not None:
            self._upload = None
            self.upload_note.value = ""

    # ------------------------------------------------------------------ running

    def _start(self, job: Callable[[Any], None], needs_input: bool = True) -> None:
        """Run `job(input)` on a background thread; buttons are disabled until it ends."""
        try:
            x = self.model_input() if needs_input else None
        except ValueError as exc:
            self.output.value = _panel_error(str(exc))
            return
        if not self._busy.acquire(blocking=False):
            return
        self._idle.clear()
        self._set_running(True)

        def work() -> None:
            try:
                job(x)
            except Exception as exc:  # the panel's own failure: show it, never lose it
                self.output.value = _panel_error(f"{type(exc).__name__}: {exc}")
            finally:
                self._set_running(False)
                self._busy.release()
                self._idle.set()

        threading.Thread(target=work, name="truss-lab-panel", daemon=True).start()

    def _set_running(self, running: bool) -> None:
        self.run_button.disabled = running
        self.run_n_button.disabled = running or self.method.value != "predict"
        self.check_button.disabled = running
        self.profile_button.disabled = running
        self.run_button.description = "Running…" if running else "Run"

    def _set_methods(self) -> None:
        """predict and the model's OpenAI-compatible methods; the picker shows only when there is a choice."""
        options = ["predict", *[m for m in self.live.methods() if m in ENDPOINTS]]
        if list(self.method.options) != options:
            keep = self.method.value if self.method.value in options else "predict"
            self.method.options = options
            self.method.value = keep
        self.method.layout.display = "" if len(options) > 1 else "none"

    def _on_examples_toggle(self, change) -> None:
        """Re-run the examples after every reload and show what each save changed (the watcher starts too)."""
        if change["new"]:
            self.live.watch(examples=True)
            self._examples_unsubscribe = self.live.on_examples(self._guarded(self._show_examples_diff))
            self.examples_diff.value = "<i>running the examples once, to compare later saves with…</i>"
            live = self.live

            def baseline_done() -> None:
                if not live.wait_for_examples(300):
                    return
                with self._examples_lock:  # never over a diff that arrived meanwhile
                    if self.examples_toggle.value and not self.examples_diff.value.startswith("<div"):
                        self.examples_diff.value = (f"<i>examples ran on v{live.version}: every save from now on "
                                                    f"shows what it changed</i>")

            threading.Thread(target=self._guarded(baseline_done), name="truss-lab-panel-examples", daemon=True).start()
        else:
            if self._examples_unsubscribe is not None:
                self._examples_unsubscribe()
                self._examples_unsubscribe = None
            self.live.watch_examples(False)
            self.examples_diff.value = ""

    def _show_examples_diff(self, d) -> None:
        with self._examples_lock:
            self.examples_diff.value = render.examples_diff_html(d)

    def _on_method(self, change) -> None:
        # Run ×N is a load test of predict and its lock; the OpenAI-compatible methods take no lock.
        self.run_n_button.disabled = change["new"] != "predict"

    def _check(self, _x: Any) -> None:
        """`truss-lab check` on this model: its examples on the real Truss server and here, and the lints."""
        self.output.value = "<i>checking against the real Truss server (the first time installs it)…</i>"
        report = (self.chain or self.live).check(note=lambda msg: setattr(self.output, "value", f"<i>{esc(msg)}</i>"))
        self.output.value = report._repr_mimebundle_()["text/html"]
        self._show_status(None)

    def _profile(self, x: Any) -> None:
        """tr.profile(x, n=N): per stage, the heaviest functions (the N box sets how many requests)."""
        self.output.value = "<i>profiling…</i>"
        profile = self.live.profile(x, n=max(1, int(self.n.value)))
        self.output.value = render.profile_html(profile)
        self._show_status(None)

    def _run_once(self, x: Any) -> None:
        result = self.live.run(x, method=self.method.value)
        self._record(result)
        self.output.value = render.result_html(result)
        self._show_status(None)

    def _run_many(self, x: Any) -> None:
        n, workers = int(self.n.value), int(self.workers.value)
        self.progress.max, self.progress.value = n, 0
        self.progress.layout.visibility = "visible"
        batch: list = []

        def tick(result) -> None:
            batch.append(result)
            self.progress.value = len(batch)

        try:
            report = self.live.bench([x], n=n, concurrency=workers, progress=False, on_result=tick)
        finally:
            self.progress.layout.visibility = "hidden"
        if batch:
            self._record(batch[-1])
            self.output.value = render.result_html(batch[-1])
        self.timeline.value = render.report_html(report)
        self._show_status(None)

    def _record(self, result) -> None:
        self.runs.insert(0, Run(time.time(), result))
        del self.runs[HISTORY:]
        self._showing_history = True
        try:
            self.history.options = [(run.label, i) for i, run in enumerate(self.runs)]
            self.history.value = None
        finally:
            self._showing_history = False

    def _on_history(self, change) -> None:
        if self._showing_history or change["new"] is None:
            return
        self.output.value = render.result_html(self.runs[change["new"]].result)

    # ------------------------------------------------------------------ status

    def _show_status(self, event) -> None:
        live = self.live
        self._set_methods()  # a reload may add or remove a method
        events = live.reload_history
        event = event or (events[-1] if events else None)
        watching = "watching for edits" if live.watching else "not watching"
        parts = [
            f"<b>{esc(live.name)}</b>",
            f"<span class='tl-version'>v{live.version}</span>",
            f"lock {live.concurrency}",
            watching,
        ]
        if event is None:
            last = "<span style='color:#666'>no reload yet</span>"
        elif event.ok:
            last = f"<span style='color:#2e7d32'>{esc(event.summary())}</span>"
        else:
            summary = event.summary()
            where = f" at {event.location}" if event.location and event.location not in summary else ""
            last = f"<span class='tl-reload-error' style='color:#c62828'>{esc(summary + where)}</span>"
        self.status.value = (
            f"<div class='truss-lab' style='font-size:13px'>{' · '.join(parts)} · last reload: {last}</div>"
        )

    # ------------------------------------------------------------------ plumbing

    def _guarded(self, fn: Callable) -> Callable:
        """Wrap a callback so that an exception shows in the panel instead of the kernel log."""

        def call(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except Exception as exc:
                self.output.value = _panel_error(f"{type(exc).__name__}: {exc}")

        return call


class _Closed:
    """What a panel holds after its model closed: the name, and a clear error for anything else."""

    def __init__(self, name: str):
        self.name = name

    def __getattr__(self, attr: str):
        from ..errors import TrussLabError

        raise TrussLabError(f"{self.name}: closed; run %truss widget for the model loaded now")


def widget(live, chain: Any = None) -> Panel:
    """An interactive panel for `live` (a LiveModel): input, examples, image upload, Run, Run ×N.
    For a Truss Chain (`widget(chain)`): its entrypoint's panel, with the chain's examples, whose
    Check runs `truss-lab check` on the whole chain."""
    from ..live import LiveModel

    if chain is None and hasattr(live, "chainlets") and hasattr(live, "entry"):
        chain, live = live, live.entry
    if not isinstance(live, LiveModel):
        raise TypeError(f"widget() takes a LiveModel (tr = truss_lab.load(path)) or a chain, not {type(live).__name__}")
    panel = Panel(live)
    panel.chain = chain
    return panel


def parse_input(text: str) -> Any:
    """JSON first (what a Truss server receives), else a Python literal (bytes, tuples, ...)."""
    text = text.strip()
    if not text:
        raise ValueError("input: empty — type JSON or a Python literal, pick an example, or upload an image")
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError) as exc:
        raise ValueError(f"input: neither JSON nor a Python literal ({type(exc).__name__}: {exc})") from None


def to_text(value: Any) -> str:
    """An example's input as the text area shows it: JSON when it is JSON, else its Python repr."""
    try:
        return json.dumps(value, indent=1) if len(json.dumps(value)) > 60 else json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


def data_uri(data: bytes, name: str = "") -> str:
    kind = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".gif": "gif", ".webp": "webp", ".bmp": "bmp"}.get(
        Path(name).suffix.lower(), "png"
    )
    return f"data:image/{kind};base64,{base64.b64encode(data).decode('ascii')}"


def shape_like_examples(data: bytes, name: str, examples: list[Any]) -> Any:
    """An uploaded image in the form the truss's examples use.

    An example that is a string (a path, URL or data URI) -> a data URI; a dict with an image-like
    string field (`image`, `url`, ...) -> the first example with that field replaced by a data URI;
    anything else -> the raw bytes.
    """
    for example in examples:
        if isinstance(example, str):
            return data_uri(data, name)
        if isinstance(example, dict):
            for key, value in example.items():
                if isinstance(value, str) and any(h in str(key).lower() for h in IMAGE_HINTS):
                    return {**example, key: data_uri(data, name)}
    return data


def _panel_error(message: str) -> str:
    return (
        f"<div class='truss-lab'>{STYLE}<div class='tl-error'><b>panel error</b>"
        f"<pre>{esc(message)}</pre></div></div>"
    )
