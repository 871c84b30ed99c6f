"""`repnas dashboard` (nas/dashboard.py): a study opens in optuna-dashboard with its objectives named, its Pareto
front, a hypervolume view and its trials' user attrs, all read through the dashboard's real HTTP API from a real
server on a free local port; the dashboard's writes go through repnas's own journal backend and lock; the objectives
are named at creation and on resume (nas/study/storage.py). The study served is the committed `data` study of
repnas 0.1.0 (3 finished trials, stored before objective names were: see test_compat.py), so nothing is trained.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

import nas.files
from nas.dashboard import INSTALL, DashboardError, open_dashboard, require_dashboard, serve_dashboard
from nas.study import StudyError, StudySettings, load_study, prepare_study, show_study
from nas.study.journal import TORN_SUFFIX, JournalFile
from space.errors import RepnasError

REPO = Path(__file__).resolve().parents[3]
OLD = Path(__file__).parent / "data" / "old_studies"
OLD_ROOT = "/tmp/repnas-old-studies-root"  # where data/make_old_studies.py put every path a study stores
NAMES = ["mAP50-95", "latency_ms"]


@pytest.fixture
def dashboard_extra() -> None:
    """Skip without the `dashboard` extra; in CI (CI=true, whose install line has the extra) fail instead."""
    try:
        require_dashboard()
    except DashboardError as err:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true, but {err}")
        pytest.skip(str(err))


def _old_study(assets: dict[str, Path], tmp_path: Path, name: str = "data") -> Path:
    """A copy of the committed study `name` under tmp_path/results, its stored paths pointed at `assets` (the same
    deterministic files it was made with); returns the results folder."""
    results = tmp_path / "results"
    shutil.copytree(OLD / name, results / name)
    log = results / name / "study.log"
    log.write_text(log.read_text().replace(OLD_ROOT, str(assets["root"])))
    return results


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=60) as response:
        return json.load(response)


def _send(method: str, url: str, body: dict) -> int:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method=method,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return response.status


@contextmanager
def _serving(server):
    """Serve `server` on a thread; yield its base URL; stop it and free its port on the way out."""
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.url.split("/dashboard/")[0]
    finally:
        server.shutdown()
        thread.join(timeout=60)
        server.server_close()
    assert not thread.is_alive()


def _attrs(serialised: list[dict]) -> dict[str, str]:
    """The dashboard's [{"key", "value"}] attrs as a dict (values as it shows them: text)."""
    return {a["key"]: a["value"] for a in serialised}


# --- the objectives' names (nas/study/storage.py) ---------------------------------------------------------------

def test_a_new_study_is_created_with_its_objectives_named(settings):
    prepare_study(settings)
    study = load_study("tiny")  # read afresh from the journal
    assert study.metric_names == NAMES
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]


def test_an_older_study_gets_its_objectives_named_once_when_resumed(assets, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    results = _old_study(assets, tmp_path)
    before = load_study("data", results=str(results))
    assert before.metric_names is None  # stored by repnas 0.1.0, before names were
    trials = [(t.number, t.state, t.values, t.user_attrs) for t in before.trials]

    for _ in range(2):  # resumed twice: named on the first, left as it is on the second
        prepare_study(StudySettings(name="data", results=str(results)))
    after = load_study("data", results=str(results))
    assert after.metric_names == NAMES
    assert [(t.number, t.state, t.values, t.user_attrs) for t in after.trials] == trials
    log = (results / "data" / "study.log").read_text()
    assert log.count('"study:metric_names"') == 1


# --- the dashboard's server -----------------------------------------------------------------------------------------

def test_the_dashboard_serves_the_study_with_names_front_hypervolume_and_attrs(dashboard_extra, assets, tmp_path,
                                                                               monkeypatch):
    monkeypatch.chdir(tmp_path)
    results = _old_study(assets, tmp_path)
    prepare_study(StudySettings(name="data", results=str(results)))  # a resume names the objectives
    exported = json.loads((OLD / "data" / "pareto.json").read_text())  # what repnas 0.1.0 exported for it
    study = load_study("data", results=str(results))

    server = open_dashboard("data", results=str(results), port=0)  # port 0: a free one
    port = server.server_address[1]
    assert server.server_address[0] == "127.0.0.1" and server.url.startswith(f"http://127.0.0.1:{port}/dashboard/")
    with _serving(server) as base:
        summaries = _get(f"{base}/api/studies")["study_summaries"]
        assert [s["study_name"] for s in summaries] == ["data"]
        assert summaries[0]["directions"] == ["maximize", "minimize"]
        study_id = summaries[0]["study_id"]
        assert server.url.endswith(f"/studies/{study_id}")

        detail = _get(f"{base}/api/studies/{study_id}")
        assert detail["name"] == "data" and detail["objective_names"] == NAMES
        assert [t["number"] for t in detail["trials"]] == [0, 1, 2]
        assert [t["state"] for t in detail["trials"]] == ["Complete"] * 3
        assert [t["values"] for t in detail["trials"]] == [t.values for t in study.trials]
        served = _attrs(detail["trials"][1]["user_attrs"])  # user attrs readable, as the trial stored them
        assert json.loads(served["arch"]) == study.trials[1].user_attrs["arch"]
        assert float(served["latency_ms"]) == study.trials[1].user_attrs["latency_ms"]
        assert float(_attrs(detail["user_attrs"])["baseline_latency_ms"]) == study.user_attrs["baseline_latency_ms"]

        # Pareto front: the trials the dashboard marks best are repnas's own front
        front = {row["trial"] for row in exported["trials"] if row["pareto"]}
        assert {t["number"] for t in detail["best_trials"]} == front == {0, 2}
        figure = _get(f"{base}/api/studies/{study_id}/plot/pareto_front")
        assert (figure["layout"]["xaxis"]["title"]["text"], figure["layout"]["yaxis"]["title"]["text"]) == tuple(NAMES)

        # hypervolume: repnas's plot, ending at the figure `repnas show` prints and repnas 0.1.0 exported
        plots = {p["id"]: json.loads(p["graph_object"]) for p in detail["plotly_graph_objects"]}
        line = plots["repnas-hypervolume"]["data"][0]
        assert line["x"] == [0, 2]  # the trials that changed it (trial 1 is off the front), and the last one
        assert line["y"][0] < line["y"][1] == pytest.approx(exported["header"]["hypervolume"], rel=1e-9)
        assert f"hypervolume {line['y'][-1]:.4g} " in show_study("data", results=str(results))
        reference = exported["header"]["reference"]["latency_ms"]
        assert f"latency_ms {reference:.3f}" in plots["repnas-hypervolume"]["layout"]["title"]["text"]

        # a trial that finishes while the dashboard is open (told through another storage object, as a worker's)
        # shows in the hypervolume view at the dashboard's next read of the study (its trial list and Pareto view
        # follow once optuna-dashboard's own 2 s trial cache expires)
        journal = results / "data" / "study.log"
        saves = journal.read_text().count(":repnas-hypervolume:")
        _get(f"{base}/api/studies/{study_id}")
        assert journal.read_text().count(":repnas-hypervolume:") == saves  # no trial finished: not saved again
        faster = {"map50_95": 0.002, "latency_ms": 1.0}  # better than every trial in both objectives
        worker = load_study("data", results=str(results))
        worker.add_trial(optuna.trial.create_trial(values=list(faster.values()), user_attrs=faster))
        detail = _get(f"{base}/api/studies/{study_id}")
        plots = {p["id"]: json.loads(p["graph_object"]) for p in detail["plotly_graph_objects"]}
        grown = plots["repnas-hypervolume"]["data"][0]
        assert grown["x"] == [0, 2, 3] and grown["y"][:2] == line["y"] and grown["y"][2] > line["y"][1]
        assert f"hypervolume {grown['y'][-1]:.4g} " in show_study("data", results=str(results))
        assert journal.read_text().count(":repnas-hypervolume:") > saves

    with pytest.raises(urllib.error.URLError):  # stopped: nothing listens on its port any more
        urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=10)


def test_the_dashboard_writes_through_repnas_journal_and_its_lock(dashboard_extra, assets, tmp_path, monkeypatch):
    """A note and a trial state saved from the dashboard are appended by repnas's JournalFile under the journal's
    FileLock: a record torn by a crashed writer is moved aside first (Optuna's own backend would append onto it and
    leave a journal no process can read), and repnas reads both writes back."""
    monkeypatch.chdir(tmp_path)
    results = _old_study(assets, tmp_path)
    log = results / "data" / "study.log"
    study = load_study("data", results=str(results))
    trial = study.ask()  # a RUNNING trial, as a live worker holds one
    taken = []
    real_acquire = nas.files.FileLock.acquire

    def acquire(lock):
        taken.append(lock.path)
        return real_acquire(lock)

    monkeypatch.setattr(nas.files.FileLock, "acquire", acquire)
    server = open_dashboard("data", results=str(results), port=0)
    backend = server.study._storage._backend  # the storage handed to the dashboard is repnas's own
    assert isinstance(backend, JournalFile) and backend.path == log
    with _serving(server) as base:
        study_id = _get(f"{base}/api/studies")["study_summaries"][0]["study_id"]
        trial_id = next(t["trial_id"] for t in _get(f"{base}/api/studies/{study_id}")["trials"]
                        if t["number"] == trial.number)
        torn = b'{"op_code":5,"worker_id":"crashed","study_id":0,"user_a'
        with open(log, "ab") as f:  # a worker killed mid-append
            f.write(torn)
        taken.clear()
        assert _send("PUT", f"{base}/api/studies/{study_id}/note", {"version": 1, "body": "looks good"}) == 204
        assert taken and set(taken) == {log.with_name("study.log.flock")}
        assert _send("POST", f"{base}/api/trials/{trial_id}/tell", {"state": "Fail"}) == 204

    assert [p.read_bytes() for p in log.parent.glob(f"study.log{TORN_SUFFIX}*")] == [torn]
    assert log.read_bytes().endswith(b"\n")
    again = load_study("data", results=str(results))  # a fresh reader: every record parses
    from optuna_dashboard import get_note

    assert get_note(again) == "looks good"
    assert again.trials[trial.number].state == TrialState.FAIL
    assert [t.state for t in again.trials[:3]] == [TrialState.COMPLETE] * 3


@pytest.mark.slow  # ~20 s: a fresh Python imports torch and the dashboard
def test_serve_dashboard_prints_its_url_and_stops_on_ctrl_c(dashboard_extra, assets, tmp_path):
    """The command's own path (`serve_dashboard`, what `repnas dashboard` runs) in a process of its own."""
    results = _old_study(assets, tmp_path)
    # Ctrl-C's handler as in a terminal: a process started in the background of a non-interactive shell (as CI may
    # run the suite) inherits SIGINT ignored, and Python then installs no KeyboardInterrupt handler
    code = ("import signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
            "from nas.dashboard import serve_dashboard; "
            f"serve_dashboard('data', results={str(results)!r}, port=0, report=lambda s: print(s, flush=True))")
    process = subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        line = process.stdout.readline()
        assert line.startswith("optuna-dashboard for study data: http://127.0.0.1:"), line
        url = line.split(": ", 1)[1].split()[0]
        base = url.split("/dashboard/")[0]
        assert [s["study_name"] for s in _get(f"{base}/api/studies")["study_summaries"]] == ["data"]
        process.send_signal(signal.SIGINT)
        out, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, out
    assert out.strip().splitlines()[-1] == "dashboard stopped"


def test_a_missing_study_or_a_taken_port_is_one_line_with_the_fix(dashboard_extra, tmp_path, assets):
    with pytest.raises(StudyError, match=r"no study 'nope': .* does not exist; start it with"):
        open_dashboard("nope", results=str(tmp_path / "results"))
    results = _old_study(assets, tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        journal = (results / "data" / "study.log").read_bytes()
        with pytest.raises(DashboardError, match=rf"cannot listen on 127.0.0.1:{port} .*pass another --port"):
            open_dashboard("data", results=str(results), port=port)
    assert (results / "data" / "study.log").read_bytes() == journal  # refused before anything was written


def test_without_the_extra_the_command_names_the_install_line(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "optuna_dashboard", None)  # `import optuna_dashboard` raises ImportError
    for start in (require_dashboard, lambda: serve_dashboard("nope", results=str(tmp_path))):
        with pytest.raises(DashboardError) as caught:
            start()
        message = str(caught.value)
        assert isinstance(caught.value, RepnasError)  # the CLI prints it as one line and exits 2
        assert INSTALL in message and "optuna-dashboard" in message and "\n" not in message
