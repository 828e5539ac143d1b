"""Orthanc errors are translated once, into what the worker should do with them."""

from __future__ import annotations

import pytest

from tests.conftest import Servers, free_port
from triage.errors import PermanentError, TransientError
from triage.orthanc import OrthancClient, StudyGone

pytestmark = pytest.mark.servers


def test_missing_study_is_study_gone(clean_servers: Servers) -> None:
    with pytest.raises(StudyGone):
        clean_servers.orthanc.study("0000-not-a-study")


def test_wrong_credentials_are_permanent(clean_servers: Servers) -> None:
    client = OrthancClient(clean_servers.settings.orthanc_base_url, "triage", "wrong-password")
    with pytest.raises(PermanentError) as caught:
        client.system()
    assert not isinstance(caught.value, StudyGone)
    assert "401" in str(caught.value)


def test_unreachable_orthanc_is_transient() -> None:
    client = OrthancClient(f"http://127.0.0.1:{free_port()}", "triage", "x", timeout=2)
    with pytest.raises(TransientError, match="unreachable"):
        client.system()


def test_answers_are_decoded_by_content_type(clean_servers: Servers) -> None:
    assert clean_servers.orthanc.system()["DicomAet"] == clean_servers.settings.orthanc_aet
    assert clean_servers.orthanc.studies() == []
