"""The Visual API request signer, checked against the official ``volcengine`` SDK's ``SignerV4``."""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from datetime import datetime, timezone

import pytest

from airflow_provider_jimeng.exceptions import JiMengConfigurationError
from airflow_provider_jimeng.hooks.signing import VisualCredentials, sign_request
from airflow_provider_jimeng.redaction import redact_text

AK = "AKLTtestaccesskeyid"
SK = "c2VjcmV0LWFjY2Vzcy1rZXktZm9yLXRlc3Rz"
FIXED = datetime(2026, 12, 6, 5, 30, 15, tzinfo=timezone.utc)


def _sdk_authorization(host: str, query: dict[str, str], body: str) -> tuple[str, dict[str, str]]:
    """Sign as ``VisualService.json`` does, through the SDK's own ``SignerV4``, at :data:`FIXED`."""
    from volcengine.auth.SignerV4 import SignerV4
    from volcengine.auth.SignParam import SignParam
    from volcengine.Credentials import Credentials

    param = SignParam()
    param.set_method("POST")
    param.set_host(host)
    param.set_path("/")
    param.set_query(OrderedDict(query))
    param.set_body(body)
    param.set_date(FIXED.replace(tzinfo=None))
    param.set_header_list(OrderedDict([("Content-Type", "application/json"), ("Host", host)]))
    result = SignerV4.sign_only(param, Credentials(AK, SK, "cv", "cn-north-1"))
    return result.authorization, dict(param.header_list)


@pytest.mark.parametrize(
    ("host", "query"),
    [
        ("visual.volcengineapi.com", {"Action": "CVSync2AsyncSubmitTask", "Version": "2022-08-31"}),
        ("visual.volcengineapi.com", {"Version": "2022-08-31", "Action": "CVSync2AsyncGetResult"}),
        ("127.0.0.1:8765", {"Action": "CVSync2AsyncSubmitTask", "Version": "2022-08-31", "Note": "a b/c~*"}),
    ],
)
def test_signature_matches_the_official_sdk(host: str, query: dict[str, str]) -> None:
    body = json.dumps({"req_key": "jimeng_t2i_v40", "prompt": "一只红狐狸 in the snow", "force_single": True})
    expected, sdk_headers = _sdk_authorization(host, query, body)
    from urllib.parse import urlencode

    url = f"https://{host}/?{urlencode(query)}"
    headers = sign_request(
        VisualCredentials(AK, SK),
        "POST",
        url,
        headers={"Content-Type": "application/json"},
        body=body.encode(),
        now=FIXED,
    )
    assert headers["Authorization"] == expected
    assert "SignedHeaders=content-type;host;x-content-sha256;x-date," in expected
    assert headers["X-Date"] == sdk_headers["X-Date"] == "20261206T053015Z"
    assert headers["X-Content-Sha256"] == sdk_headers["X-Content-Sha256"]
    assert headers["Host"] == host


def test_default_ports_are_not_signed_and_naive_times_are_utc() -> None:
    credentials = VisualCredentials(AK, SK)
    with_port = sign_request(credentials, "POST", "https://visual.volcengineapi.com:443/?Action=A", now=FIXED)
    without = sign_request(
        credentials, "POST", "https://visual.volcengineapi.com/?Action=A", now=FIXED.replace(tzinfo=None)
    )
    assert with_port == without


def test_the_secret_never_shows(monkeypatch: pytest.MonkeyPatch) -> None:
    handed: list[str] = []
    monkeypatch.setattr("airflow_provider_jimeng.hooks.signing.mask_secret", handed.append)
    credentials = VisualCredentials(AK, SK)
    assert handed == [SK]  # Airflow's masker, for task logs
    assert SK not in repr(credentials)
    assert SK not in str(credentials)
    assert redact_text(f"failed with {SK}") == "failed with ***"
    headers = sign_request(credentials, "POST", "https://visual.volcengineapi.com/?Action=A", now=FIXED)
    assert SK not in json.dumps(headers)
    # The signature itself is cut out of any text that carries it.
    assert "Signature=<redacted>" in redact_text(headers["Authorization"])


@pytest.mark.parametrize(
    ("access_key_id", "secret", "parameter"), [("", SK, "access_key_id"), (AK, " ", "secret_access_key")]
)
def test_empty_keys_are_refused_by_name(
    access_key_id: str, secret: str, parameter: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    with pytest.raises(JiMengConfigurationError, match=parameter) as raised:
        VisualCredentials(access_key_id, secret)
    assert raised.value.parameter == parameter


def test_a_relative_url_is_refused() -> None:
    with pytest.raises(JiMengConfigurationError, match="url"):
        sign_request(VisualCredentials(AK, SK), "POST", "/?Action=A", now=FIXED)
