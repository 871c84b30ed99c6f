"""`repnas dashboard NAME`: a study in optuna-dashboard, served on the storage repnas itself opens for the study.

The dashboard writes as well as reads (notes, trial states and user attrs, a study renamed or deleted). Given a
plain journal path (`optuna-dashboard results/NAME/study.log`) it would open the file with Optuna's own journal
backend, which neither takes the lock every repnas worker appends under (`nas.files.FileLock` on study.log.flock)
nor repairs a record torn by a crash: a note saved beside live workers could interleave with their appends, or land
on a torn line and leave a journal no process can read. Here the dashboard's server gets the very storage object
`nas.study.storage.storage_for` opens (a `JournalStorage` on `nas.study.journal.JournalFile`, or the RDB storage of
`--storage URL`), so its writes are appended exactly as a worker's are.

What the dashboard shows of a repnas study: the objectives under the names the study stores (`mAP50-95`,
`latency_ms`; `create_or_load_study` sets them with `study.set_metric_names`), its own Pareto-front view (drawn
from the trials' values), every trial's user attrs, and a hypervolume view. optuna-dashboard has none of its own,
so repnas saves one as a user-defined plot (`optuna_dashboard.save_plotly_graph_object`, shown on the study's page):
the hypervolume of the finished trials up to each trial, with the reference point and area `repnas show` reports
(`nas.pareto.default_reference`, `nas.pareto.hypervolume`). It is written when the server starts and again when the
dashboard asks for the study after another trial finished.

An optional extra: `pip install -e ".[dashboard]"` (optuna-dashboard, pinned, and plotly for the hypervolume plot).
"""

from __future__ import annotations

import errno
import importlib
import ipaddress
import logging
import math
import socket
import threading
from collections.abc import Callable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

import optuna
from optuna.trial import TrialState

from nas.pareto import default_reference, hypervolume, pareto_table
from nas.study.report import trial_records
from nas.study.settings import StudyError, StudySettings
from nas.study.storage import journal_path, name_objectives, storage_for, stored_settings
from space.errors import RepnasError

LOG = logging.getLogger("repnas.dashboard")
INSTALL = 'pip install -e ".[dashboard]"'
DEFAULT_HOST = "127.0.0.1"  # this machine only: the dashboard has no login and can change the study
DEFAULT_PORT = 8080  # optuna-dashboard's own default
HYPERVOLUME_PLOT_ID = "repnas-hypervolume"  # the user-defined plot's id (its system attrs: dashboard:plot_data:ID:k)
_FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)  # trials that may carry both objectives


class DashboardError(RepnasError):
    """The dashboard cannot start as asked: the extra is not installed, or the address cannot be listened on."""


def require_dashboard() -> None:
    """Raise DashboardError (one line naming the install command) unless optuna-dashboard and plotly import."""
    missing = []
    for module, package in (("optuna_dashboard", "optuna-dashboard"), ("plotly", "plotly")):
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(package)
    if missing:
        raise DashboardError(f"repnas dashboard needs the optional `dashboard` extra ({' and '.join(missing)} "
                             f"{'is' if len(missing) == 1 else 'are'} not installed): install it with `{INSTALL}` "
                             "and run again")


def hypervolume_history(study: optuna.Study, settings: StudySettings) -> tuple[list[int], list[float],
                                                                                tuple[float, float]]:
    """The hypervolume of the study's finished trials up to each one, in trial-number order.

    Returns (trial numbers, hypervolume after each, reference point (mAP50-95, latency_ms)). The last value is the
    figure `repnas show` prints: the same trials (`nas.pareto.pareto_table`'s finished ones with both objectives),
    reference point and area (`nas.pareto`).
    """
    records = trial_records(study, settings, confirmed={})  # confirmed mAP plays no part in the hypervolume
    reference = default_reference(records)
    done = pareto_table(records).dropna(subset=["map50_95", "latency_ms"]).sort_values("trial", kind="stable")
    numbers = [int(n) for n in done["trial"]]
    m, lat = done["map50_95"].to_numpy(float), done["latency_ms"].to_numpy(float)  # (N,), (N,)
    return numbers, [hypervolume(m[:k + 1], lat[:k + 1], reference) for k in range(len(numbers))], reference


def hypervolume_figure(study: optuna.Study, settings: StudySettings):  # -> plotly.graph_objects.Figure
    """The hypervolume view the dashboard shows: `hypervolume_history` as a step line over trial numbers.

    Only the trials that changed the hypervolume, and the last finished one, are points (a step line draws the
    rest), with plotly's bare template: the figure is saved into the study again after every finished trial, so it
    is kept to about a kilobyte rather than growing with the trial count (the default template alone is 6 kB).
    """
    import plotly.graph_objects as go

    numbers, values, (ref_map, ref_latency) = hypervolume_history(study, settings)
    kept = [k for k in range(len(numbers))
            if k in (0, len(numbers) - 1) or not math.isclose(values[k], values[k - 1], rel_tol=1e-9)]
    figure = go.Figure(go.Scatter(x=[numbers[k] for k in kept], y=[values[k] for k in kept], mode="lines+markers",
                                  line_shape="hv", name="hypervolume",
                                  hovertemplate="trial %{x}: hypervolume %{y:.4g}<extra></extra>"))
    figure.update_layout(
        template="none", title=f"Hypervolume (repnas): reference mAP50-95 {ref_map:g}, latency_ms {ref_latency:.3f}",
        xaxis_title="trial", yaxis_title="hypervolume (mAP50-95 x ms)", margin={"l": 70, "r": 20, "t": 50, "b": 50})
    return figure


class _HypervolumePlot:
    """Saves the hypervolume view into the study, again only when the set of finished trials changed; one writer
    at a time (the server answers requests on several threads)."""

    def __init__(self, study: optuna.Study, settings: StudySettings):
        self.study, self.settings = study, settings
        self._lock = threading.Lock()
        self._seen: tuple[int, ...] | None = None
        self._broken = False

    def __call__(self) -> None:
        from optuna_dashboard import save_plotly_graph_object

        with self._lock:
            if self._broken:
                return
            finished = tuple(t.number for t in self.study.get_trials(deepcopy=False, states=_FINISHED))
            if finished == self._seen:
                return
            try:
                save_plotly_graph_object(self.study, hypervolume_figure(self.study, self.settings),
                                         graph_object_id=HYPERVOLUME_PLOT_ID)
            except StudyError as err:  # e.g. a journal this user may read but not append to
                self._broken = True
                LOG.warning("warning: the hypervolume view is not updated (the rest of the dashboard is): %s", err)
                return
            except Exception:  # a bug here must not take the dashboard's study page down with it
                self._broken = True
                LOG.exception("the hypervolume view failed and is not updated (a bug: please report it)")
                return
            self._seen = finished


def dashboard_app(study: optuna.Study, settings: StudySettings) -> Callable[..., Any]:
    """optuna-dashboard's WSGI app on the study's storage, saving the hypervolume view now and, before it answers
    a request for this study, whenever another trial finished since."""
    from optuna_dashboard import wsgi

    storage = study._storage  # the storage object repnas opened (storage_for), not a copy of it
    app = wsgi(storage)
    refresh = _HypervolumePlot(study, settings)
    refresh()
    detail = f"/api/studies/{storage.get_study_id_from_name(study.study_name)}"

    def with_hypervolume(environ: dict, start_response: Callable) -> Any:
        if environ.get("REQUEST_METHOD") == "GET" and environ.get("PATH_INFO", "").rstrip("/") == detail:
            refresh()
        return app(environ, start_response)

    return with_hypervolume


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # no line per request on stderr
        pass


class DashboardServer(ThreadingMixIn, WSGIServer):
    """The dashboard's HTTP server, bound and ready (`open_dashboard`): `serve_forever()` serves until
    `shutdown()` (from another thread) or Ctrl-C; `server_close()` frees the port. `study`: the study it shows;
    `url`: its page."""

    daemon_threads = True  # a request still open never keeps the process alive
    study: optuna.Study
    url: str


class _DashboardServer6(DashboardServer):
    address_family = socket.AF_INET6


def open_dashboard(name: str, *, storage: str | None = None, results: str = "results", host: str = DEFAULT_HOST,
                   port: int = DEFAULT_PORT) -> DashboardServer:
    """Bind optuna-dashboard for study `name` on `host:port` (port 0: a free port) and return its server.

    `storage`: the study's URL (None: the journal file `results/NAME/study.log`). The dashboard gets the storage
    `storage_for` opens (see the module docstring). Raises DashboardError when the extra is missing or the address
    cannot be bound, StudyError when there is no such study (StorageError when its storage cannot be read).
    """
    require_dashboard()
    if not (isinstance(port, int) and 0 <= port <= 65535):
        raise DashboardError(f"--port {port!r} must be a port number in 0..65535 (0: any free port)")
    settings = StudySettings(name=name, storage=storage, results=results)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    backend = storage_for(settings, create=False)
    try:
        study = optuna.load_study(study_name=name, storage=backend)
    except KeyError:
        raise StudyError(f"no study {name!r} in {storage or journal_path(settings)}") from None
    try:
        ipv6 = ipaddress.ip_address(host).version == 6
    except ValueError:  # a host name: IPv4, as `localhost` is in most /etc/hosts
        ipv6 = False
    try:  # bound before anything is written into the study
        server = (_DashboardServer6 if ipv6 else DashboardServer)((host, port), _Quiet)
    except OSError as err:
        if err.errno == errno.EADDRINUSE:
            fix = f"something listens on port {port} already; pass another --port (0: any free one)"
        else:
            fix = "pass a --host this machine has (the default 127.0.0.1: this machine only)"
        raise DashboardError(f"cannot listen on {host}:{port} ({err.strerror or err}); {fix}") from None
    try:
        name_objectives(study)  # a study made before repnas named them shows "mAP50-95" and "latency_ms" too
        server.set_app(dashboard_app(study, stored_settings(study, name, storage, results)))
    except BaseException:
        server.server_close()
        raise
    bound_host, bound_port = server.server_address[:2]
    shown = f"[{bound_host}]" if ipv6 else bound_host
    server.study = study
    server.url = f"http://{shown}:{bound_port}/dashboard/studies/{backend.get_study_id_from_name(name)}"
    return server


def serve_dashboard(name: str, *, storage: str | None = None, results: str = "results", host: str = DEFAULT_HOST,
                    port: int = DEFAULT_PORT, report: Callable[[str], None] = print) -> None:
    """`repnas dashboard`: `open_dashboard`, report its URL, serve until Ctrl-C (which returns normally)."""
    server = open_dashboard(name, storage=storage, results=results, host=host, port=port)
    try:
        if not _is_loopback(host):
            report(f"warning: listening on {host}: the dashboard has no login, and whoever reaches it can change "
                   f"study {name} (notes, trial states, deleting it)")
        report(f"optuna-dashboard for study {name}: {server.url} (Ctrl-C stops it)")
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            report("dashboard stopped")
    finally:
        server.server_close()


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
