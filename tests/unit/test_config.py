from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from recsvc.config import Settings, load_settings
from recsvc.errors import ConfigError


def test_defaults_need_no_configuration() -> None:
    s = load_settings(env={})
    assert s == Settings()
    assert s.resolved_history_db() == Path("var/history.sqlite3")


def test_precedence_defaults_then_env_then_overrides() -> None:
    env = {"RECSVC_PORT": "6000", "RECSVC_MAX_K": "50", "RECSVC_DATA_DIR": "/tmp/x", "PATH": "/bin"}
    s = load_settings(env=env, port=7000, triton_url=None)
    assert s.port == 7000                    # override beats env
    assert s.max_k == 50                     # env beats default
    assert s.data_dir == Path("/tmp/x")
    assert s.triton_url == Settings().triton_url   # a None override (flag not given) masks nothing


def test_unknown_env_key_rejected_with_its_name() -> None:
    with pytest.raises(ConfigError, match="RECSVC_PROT"):
        load_settings(env={"RECSVC_PROT": "1"})


def test_unknown_override_rejected() -> None:
    with pytest.raises(ConfigError, match="'colour'"):
        load_settings(env={}, colour="red")


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"RECSVC_PORT": "abc"}, r"RECSVC_PORT \(setting 'port'\) from environment: 'abc' is not a valid int"),
        ({"RECSVC_MAX_K": "0"}, "'max_k' must be > 0"),
        ({"RECSVC_PORT": "70000"}, "0..65535"),
        ({"RECSVC_GRACE_S": "-1"}, "'grace_s' must be > 0"),
        ({"RECSVC_MAX_K": "500", "RECSVC_NUM_CANDIDATES": "100"}, r"max_k \(500\) cannot exceed num_candidates"),
        ({"RECSVC_NUM_CANDIDATES": "-1"}, r"'num_candidates' must be >= 0 \(0: the bundle's\)"),
        ({"RECSVC_DEFAULT_K": "0"}, "'default_k' must be > 0"),
        ({"RECSVC_MAX_K": "5"}, r"default_k \(10\) cannot exceed max_k \(5\): lower RECSVC_DEFAULT_K"),
        ({"RECSVC_HISTORY_KEEP": "10"}, "history_keep"),
        ({"RECSVC_INDEX_KIND": "annoy"}, "'index_kind' must be one of auto, flat"),
        ({"RECSVC_INDEX_DEVICE": "tpu"}, "'index_device' must be one of"),
        ({"RECSVC_INDEX_NPROBE": "-1"}, "'index_nprobe' must be >= 0"),
        ({"RECSVC_INDEX_TARGET_RECALL": "1.5"}, "index_target_recall"),
        ({"RECSVC_METRICS_PORT": "70000"}, "'metrics_port' must be in 0..65535"),
        ({"RECSVC_WORKERS": "2", "RECSVC_L2_BACKEND": "memory"}, "l2_backend=memory cannot be used with a SQLite"),
        ({"RECSVC_SQLITE_POLL_S": "0"}, "'sqlite_poll_s' must be in"),
        ({"RECSVC_REPOSITORY_POLL_S": "-1"}, "repository_poll_s"),
        ({"RECSVC_DRAIN_DELAY_S": "-1"}, "'drain_delay_s' must be in 0..600"),
        ({"RECSVC_DRAIN_DELAY_S": "nan"}, "'drain_delay_s' must be in 0..600"),
        ({"RECSVC_DRAIN_DELAY_S": "inf"}, "'drain_delay_s' must be in 0..600"),
        ({"RECSVC_MAX_IN_FLIGHT": "0"}, "'max_in_flight' must be in 1..100000"),
        ({"RECSVC_MAX_IN_FLIGHT_EVENTS": "1000000"}, "'max_in_flight_events' must be in 1..100000"),
    ],
)
def test_invalid_values_rejected(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings(env=env)


def test_num_candidates_defaults_to_the_bundles_so_max_k_is_not_bound_by_it_here() -> None:
    assert Settings().num_candidates == 0
    # The bundle's C is known only when a version loads (pipeline.load_serving_bundle checks it there).
    assert load_settings(env={"RECSVC_MAX_K": "300"}).max_k == 300
    assert load_settings(env={"RECSVC_NUM_CANDIDATES": "300", "RECSVC_MAX_K": "300"}).num_candidates == 300


def test_settings_are_frozen() -> None:
    s = Settings()
    with pytest.raises(AttributeError):
        s.port = 1  # type: ignore[misc]
    assert s.with_overrides(port=1).port == 1


def test_l2_auto_follows_the_store_and_local_l2_with_shared_store_is_refused() -> None:
    assert load_settings(env={}).resolved_l2() == "memory"
    assert load_settings(env={"RECSVC_HISTORY_STORE": "redis"}).resolved_l2() == "redis"
    assert load_settings(env={"RECSVC_HISTORY_STORE": "redis", "RECSVC_REDIS_CLUSTER": "true"}).resolved_l2() == "none"
    with pytest.raises(ConfigError, match="l2_backend=memory cannot be used with history_store=redis"):
        load_settings(env={"RECSVC_HISTORY_STORE": "redis", "RECSVC_L2_BACKEND": "memory"})


def test_workers_with_redis_and_deny_list_default() -> None:
    s = load_settings(env={"RECSVC_WORKERS": "4", "RECSVC_HISTORY_STORE": "redis", "RECSVC_DATA_DIR": "/d"})
    assert s.workers == 4
    assert s.resolved_deny_list() == Path("/d/deny_list.txt")


def test_unknown_env_key_suggests_the_closest_names_and_the_reference() -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(env={"RECSVC_METRIC_PORT": "9000"})
    message = str(err.value)
    assert "did you mean RECSVC_METRICS_PORT" in message
    assert "docs/CONFIGURATION.md" in message
    assert "\n" not in message


def test_unknown_env_key_with_nothing_close_lists_every_valid_name() -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(env={"RECSVC_ZQXW": "1"})
    message = str(err.value)
    for f in dataclasses.fields(Settings):
        assert f"RECSVC_{f.name.upper()}" in message
    assert "docs/CONFIGURATION.md" in message


def test_unknown_override_suggests_field_names() -> None:
    with pytest.raises(ConfigError, match="did you mean triton_url"):
        load_settings(env={}, triton_ulr="h:1")


def test_cli_reports_an_unknown_setting_in_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from recsvc.cli import main

    monkeypatch.setenv("RECSVC_PROT", "1")
    assert main(["deny", "list", "--data-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown setting 'RECSVC_PROT'" in err[0] and "RECSVC_PORT" in err[0], err


def test_workers_share_the_embedded_store_without_a_local_l2() -> None:
    single = load_settings({})
    assert not single.shares_sqlite and single.resolved_l2() == "memory"
    for env in ({"RECSVC_WORKERS": "2"}, {"RECSVC_REUSE_PORT": "1"}):
        shared = load_settings(env)
        assert shared.shares_sqlite and shared.resolved_l2() == "none"
    assert not load_settings({"RECSVC_WORKERS": "2", "RECSVC_HISTORY_STORE": "redis"}).shares_sqlite


@pytest.mark.parametrize(("url", "problem"), [
    ("bogus:::", "expected host:port, got 'bogus:::'"),
    ("triton", "expected host:port, got 'triton'"),
    ("127.0.0.1:99999", "port 99999 of '127.0.0.1:99999' is not in 1..65535"),
    ("h:0", "port 0 of 'h:0' is not in 1..65535"),
])  # fmt: skip
def test_triton_url_must_be_a_grpc_address(url: str, problem: str) -> None:
    """gRPC would wrap port 99999 to 34463, and a malformed one fails only when dialled (after a publish)."""
    with pytest.raises(ConfigError, match=re.escape(f"setting 'triton_url': {problem}")):
        load_settings(env={"RECSVC_TRITON_URL": url})


@pytest.mark.parametrize("url", ["127.0.0.1:8001", "shop-recsvc-triton-admin:8001", "[::1]:8001", "dns:///triton:8001",
                                 "unix:/run/triton.sock"])  # fmt: skip
def test_triton_url_takes_host_port_and_grpc_schemes(url: str) -> None:
    assert load_settings(env={"RECSVC_TRITON_URL": url}).triton_url == url
