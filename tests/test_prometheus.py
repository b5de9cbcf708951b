"""A real Prometheus scrapes a real sidecar during a real erase; every PromQL expression of
the Grafana dashboard and of the alert rules is a valid query there, and every eraser_*
metric it names exists. vLLM's panels (vllm:*) are checked against the metric names
declared in the installed vLLM's source (vllm/v1/metrics/loggers.py): this test does not
start vLLM. The image's health probe (deploy/docker/healthcheck.py) is run against it too.
Tools: deploy/tools/install-tools.sh."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import grpc
import pytest
import yaml

from conftest import cg_erase
from eraser_proto.eraser.v1 import eraser_pb2 as pb
from eraser_proto.eraser.v1 import eraser_pb2_grpc as pb_grpc
from sidecar.config import SidecarConfig
from sidecar.server import start

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
FAST = pb.EraseOptions(damping=0.1, max_iterations=100, tolerance=1e-3)
# Grafana's variables, as the dashboard would send them with "All" selected.
GRAFANA_VARS = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "5m", "$namespace": ".*",
                "$adapter": ".*", "${datasource}": "prometheus"}
PROMQL_FUNCTIONS_AND_WORDS = {"sum", "by", "without", "rate", "increase", "histogram_quantile", "max", "min",
                              "and", "or", "unless", "deriv", "le", "count", "avg", "on", "ignoring"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def query(base: str, expr: str) -> dict:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return json.load(r)
    except urllib.error.HTTPError as e:
        return json.load(e)


def dashboard_exprs() -> list[str]:
    board = json.loads((DEPLOY / "grafana" / "eraser-sidecar.json").read_text())
    exprs = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    for var in board["templating"]["list"]:
        if var["type"] == "query":
            # label_values(METRIC{...}, label) is Grafana's; the series selector is PromQL.
            m = re.fullmatch(r"label_values\((.*), *(\w+)\)", var["query"]["query"])
            exprs.append(m.group(1))
    return exprs


def rule_exprs() -> list[str]:
    rules = yaml.safe_load((DEPLOY / "prometheus" / "rules.yaml").read_text())
    return [r["expr"] for g in rules["groups"] for r in g["rules"]]


def substitute(expr: str) -> str:
    for var, value in sorted(GRAFANA_VARS.items(), key=lambda kv: -len(kv[0])):
        expr = expr.replace(var, value)
    assert "$" not in expr, f"an unknown Grafana variable in {expr}"
    return expr


def metric_names(expr: str) -> set[str]:
    # Strip strings and label matchers, then take the identifiers that are not PromQL words.
    bare = re.sub(r'"[^"]*"', '""', expr)
    bare = re.sub(r"\{[^}]*\}", "", bare)
    bare = re.sub(r"\[[^\]]*\]", "", bare)
    bare = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", bare)
    names = set(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", bare)) - PROMQL_FUNCTIONS_AND_WORDS
    return {n for n in names if not re.fullmatch(r"\d+|e\d+", n)}


def vllm_exported_names() -> set[str]:
    import importlib.util

    spec = importlib.util.find_spec("vllm")
    if spec is None:
        pytest.fail("vllm is not installed (make install)")
    source = (Path(spec.origin).parent / "v1" / "metrics" / "loggers.py").read_text()
    names = set()
    for kind, name in re.findall(r"(counter|gauge|histogram|Counter|Gauge|Histogram)\w*\(\s*name=\"(vllm:[a-z0-9_:]+)\"",
                                 source):
        kind = kind.lower()
        if kind == "counter":
            names |= {name + "_total", name + "_created"}
        elif kind == "histogram":
            names |= {name + s for s in ("_bucket", "_sum", "_count", "_created")}
        else:
            names.add(name)
    assert len(names) > 20, "found vLLM's metric definitions"
    return names


@pytest.fixture(scope="module")
def prometheus_bin():
    binary = shutil.which("prometheus")
    if not binary:
        pytest.fail("prometheus is not installed; run: bash deploy/tools/install-tools.sh")
    return binary


def test_dashboard_and_alerts_query_real_series(tmp_path, prometheus_bin, tiny_base, tiny_adapter, train_file):
    running = start(SidecarConfig(store=tmp_path / "store", grpc_port=0, metrics_port=0, drain_seconds=2.0,
                                  erase=cg_erase()))
    prom = None
    try:
        with grpc.insecure_channel(running.target) as channel:
            stub = pb_grpc.EraserStub(channel)
            stub.RegisterAdapter(pb.RegisterAdapterRequest(name="prom-a", base_model=str(tiny_base),
                                                           adapter_path=str(tiny_adapter), dataset_path=str(train_file)))
            port = free_port()
            config = tmp_path / "prometheus.yml"
            config.write_text(yaml.safe_dump({
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "scrape_configs": [{"job_name": "eraser", "static_configs": [
                    {"targets": [f"127.0.0.1:{running.metrics_port}"]}]}]}))
            log = (tmp_path / "prometheus.log").open("w")
            prom = subprocess.Popen([prometheus_bin, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                                     f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT)
            base = f"http://127.0.0.1:{port}"
            job = stub.Erase(pb.EraseRequest(adapter="prom-a", request_id="prom-1", remove_ids=["born-ann"], options=FAST))
            final = None
            for final in stub.WatchJob(pb.GetJobRequest(id=job.id), timeout=120):
                pass
            assert final.state == pb.JOB_STATE_SUCCEEDED, final.error
            erased_at = time.time()
            # Wait for a scrape after the erase: the succeeded job is counted.
            deadline = time.time() + 40
            while True:
                assert prom.poll() is None, (tmp_path / "prometheus.log").read_text()[-3000:]
                try:
                    result = query(base, 'eraser_jobs_total{outcome="succeeded"} > 0')
                    if result.get("data", {}).get("result"):
                        last = float(query(base, "timestamp(eraser_queue_depth)")["data"]["result"][0]["value"][1])
                        if last > erased_at:
                            break
                except (OSError, KeyError, IndexError):
                    pass
                assert time.time() < deadline, "Prometheus did not scrape the sidecar after the erase"
                time.sleep(0.5)
            time.sleep(2)  # two more scrapes: rate() needs two samples

            names_data = query(base, "group by (__name__) ({__name__=~\".+\"})")["data"]["result"]
            scraped = {r["metric"]["__name__"] for r in names_data}
            # What the sidecar exports: its families (# TYPE), series or not yet. Labelled
            # families appear as series once a label value exists (eraser_replicas_behind
            # and eraser_swaps_total need a configured vLLM replica, which this test has not).
            with urllib.request.urlopen(f"http://127.0.0.1:{running.metrics_port}/metrics", timeout=10) as r:
                exposition = r.read().decode()
            exported = set()
            for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", exposition, re.M):
                suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created")}
                base_name = name.removesuffix("_total") if kind == "counter" else name
                exported |= {base_name + s for s in suffixes.get(kind, ("",))}
            assert scraped - {"up", "scrape_duration_seconds", "scrape_samples_scraped", "scrape_series_added",
                              "scrape_samples_post_metric_relabeling"} <= exported
            vllm_names = vllm_exported_names()
            exprs = [("dashboard", e) for e in dashboard_exprs()] + [("rules", e) for e in rule_exprs()]
            assert len(exprs) > 25
            used = set()
            for origin, expr in exprs:
                concrete = substitute(expr)
                answer = query(base, concrete)
                assert answer["status"] == "success", f"{origin}: {concrete}: {answer.get('error')}"
                for name in metric_names(concrete):
                    used.add(name)
                    if name.startswith("vllm:"):
                        assert name in vllm_names, f"{origin}: vLLM exports no {name} ({concrete})"
                    else:
                        assert name.startswith("eraser_"), f"{origin}: an unexpected metric {name} in {concrete}"
                        assert name in exported, f"{origin}: the sidecar exports no {name} ({concrete})"
            # Series with data after this erase (all but the per-replica ones).
            for name in ("eraser_jobs_total", "eraser_job_duration_seconds_bucket", "eraser_job_stage_duration_seconds_bucket",
                         "eraser_queue_depth", "eraser_jobs_running", "eraser_adapter_version",
                         "eraser_swap_duration_seconds_bucket", "eraser_solver_residual_bucket",
                         "eraser_rows_erased_total", "eraser_jobs_accepted_total", "eraser_rpc_duration_seconds_bucket",
                         "eraser_utility_checks_total", "eraser_utility_retain_nll_rise_bucket"):
                assert name in scraped, f"no series {name} after an erase"
            # The panels the issue asks for.
            for name in ("eraser_jobs_total", "eraser_job_stage_duration_seconds_bucket", "eraser_queue_depth",
                         "eraser_adapter_version", "eraser_swap_duration_seconds_bucket", "eraser_replicas_behind",
                         "eraser_solver_residual_bucket", "vllm:request_success_total",
                         "vllm:e2e_request_latency_seconds_bucket"):
                assert name in used, f"no panel or rule uses {name}"
            versions = query(base, substitute('max by (adapter) (eraser_adapter_version{adapter=~"$adapter"})'))
            assert {r["metric"]["adapter"]: r["value"][1] for r in versions["data"]["result"]} == {"prom-a": "2"}
            stages = query(base, "sum by (stage) (eraser_job_stage_duration_seconds_count) > 0")["data"]["result"]
            assert {"gradient", "solve"} <= {r["metric"]["stage"] for r in stages}

        # The image's built-in health probe speaks grpc.health.v1 to this sidecar.
        probe = [sys.executable, str(DEPLOY / "docker" / "healthcheck.py"), "--address", running.target, "--plaintext"]
        assert subprocess.run(probe + ["--service", "eraser.v1.Eraser"], timeout=30).returncode == 0
        assert subprocess.run(probe + ["--service", "eraser.serving"], timeout=30).returncode == 0
        bad = subprocess.run(probe + ["--service", "no.such.Service"], capture_output=True, text=True, timeout=30)
        assert bad.returncode == 1 and "NOT_FOUND" in bad.stderr
    finally:
        if prom is not None:
            prom.terminate()
            try:
                prom.wait(10)
            except subprocess.TimeoutExpired:
                prom.kill()
                prom.wait()
        running.stop(2.0)
