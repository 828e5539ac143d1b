"""The SR of an analysis: TID 1500 content, IHE AIR header, determinism, external validators."""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import io
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.sr.codedict import codes

from tests import validators
from triage import uids
from triage.findings import CodedConcept, Finding, ModelIdentity, ModelResult
from triage.priority import PriorityClass
from triage.report import PROCESSING_ALGORITHM, build_report

# The head CT test file has a single-component patient name; the SR copies it unchanged.
pytestmark = pytest.mark.filterwarnings("ignore:The string .* person name:UserWarning")

WHEN = dt.datetime(2024, 5, 1, 10, 30, 15, 250000, tzinfo=dt.UTC)
MODEL = ModelIdentity(
    id="ich-ct",
    version="1.2.0",
    name="Intracranial haemorrhage detector",
    manufacturer="Triage reference models",
    weights_sha256="ab" * 32,
    regulatory_status="research use only",
)
HAEMORRHAGE = CodedConcept("50960005", "SCT", "Hemorrhage")
FRACTURE = CodedConcept("RID5036", "RADLEX", "Fracture")
PATIENT_STUDY_ATTRIBUTES = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
)


def head_ct_series(*, with_method: bool = True) -> list[pydicom.Dataset]:
    """Three slices of a head CT: one real slice copied with new instance and series UIDs."""
    source = pydicom.dcmread(get_testdata_file("693_UNCR.dcm"), stop_before_pixels=True)
    # The file says Patient Identity Removed YES without the Type 1C method.
    if with_method:
        source.DeidentificationMethod = "Test data"
    source.SeriesInstanceUID = uids.derived_uid("test-series", source.SeriesInstanceUID)
    series = []
    for number in (1, 2, 3):
        instance = copy.deepcopy(source)
        instance.SOPInstanceUID = uids.derived_uid("test-slice", source.SOPInstanceUID, str(number))
        instance.InstanceNumber = number
        series.append(instance)
    return series


def ct_small() -> list[pydicom.Dataset]:
    return [pydicom.dcmread(get_testdata_file("CT_small.dcm"), stop_before_pixels=True)]


def result_for(evidence: list[pydicom.Dataset]) -> ModelResult:
    """One positive critical finding on the middle slice and one negative finding."""
    key = evidence[len(evidence) // 2]
    return ModelResult(
        model=MODEL,
        series_instance_uid=key.SeriesInstanceUID,
        input_sop_instance_uids=tuple(ds.SOPInstanceUID for ds in evidence),
        findings=(
            Finding(
                HAEMORRHAGE, 0.93, 0.5, PriorityClass.CRITICAL, key.SOPInstanceUID, key.SOPClassUID
            ),
            Finding(FRACTURE, 0.12, 0.6, None, evidence[0].SOPInstanceUID, key.SOPClassUID),
        ),
    )


def build(
    evidence: list[pydicom.Dataset], fingerprint: str = "f1", result: ModelResult | None = None
) -> hd.sr.Comprehensive3DSR:
    return build_report(
        evidence=evidence,
        results=[result or result_for(evidence)],
        inputs_fingerprint=fingerprint,
        content_datetime=WHEN,
    )


def encoded(dataset: pydicom.Dataset) -> bytes:
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def head_ct_series_without_method() -> list[pydicom.Dataset]:
    return head_ct_series(with_method=False)


SOURCES = {
    "head-ct-series": head_ct_series,
    "ct-small": ct_small,
    "deidentified-without-method": head_ct_series_without_method,
}


@pytest.fixture(scope="module", params=sorted(SOURCES))
def written(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """(source headers, path of the SR built from them) for each test source."""
    evidence = SOURCES[request.param]()
    path = tmp_path_factory.mktemp("sr") / f"{request.param}.dcm"
    build(evidence).save_as(path, enforce_file_format=True)
    return evidence, path


def test_round_trip_copies_patient_and_study_into_a_new_series(written) -> None:
    evidence, path = written
    sr = pydicom.dcmread(path)
    source = evidence[0]
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"
    assert sr.Modality == "SR"
    for attribute in PATIENT_STUDY_ATTRIBUTES:
        assert sr.get(attribute) == source.get(attribute), attribute
    assert sr.SeriesInstanceUID == uids.sr_series_uid(source.StudyInstanceUID)
    assert sr.SeriesInstanceUID != source.SeriesInstanceUID
    assert sr.SOPInstanceUID == uids.sr_instance_uid(
        source.StudyInstanceUID, ["ich-ct@1.2.0"], "f1"
    )
    assert sr.VerificationFlag == "UNVERIFIED"
    assert sr.Manufacturer == "Triage"
    assert sr.SeriesDescription == "AI triage result (unverified)"
    # Every date and time is at the source's UTC offset (CT_small says -0500), or at the
    # site zone's (UTC here) when the source has none.
    offset = source.get("TimezoneOffsetFromUTC", "+0000")
    assert sr.TimezoneOffsetFromUTC == offset
    local = WHEN + dt.timedelta(hours=int(offset[:3]), minutes=int(offset[0] + offset[3:]))
    assert sr.ContentDate == local.strftime("%Y%m%d")
    assert sr.ContentTime.startswith(local.strftime("%H%M%S"))


def test_contributing_equipment_names_the_algorithm(written) -> None:
    _, path = written
    sr = pydicom.dcmread(path)
    algorithms = [
        item
        for item in sr.ContributingEquipmentSequence
        if item.PurposeOfReferenceCodeSequence[0].CodingSchemeDesignator == "99IHE"
    ]
    assert len(algorithms) == 1
    (item,) = algorithms
    purpose = item.PurposeOfReferenceCodeSequence[0]
    assert (purpose.CodeValue, purpose.CodeMeaning) == (
        PROCESSING_ALGORITHM.value,
        PROCESSING_ALGORITHM.meaning,
    )
    assert item.Manufacturer == MODEL.manufacturer
    assert item.ManufacturerModelName == MODEL.name
    assert item.SoftwareVersions == MODEL.version
    assert item.DeviceUID == uids.derived_uid(
        "device", MODEL.id, MODEL.version, MODEL.weights_sha256
    )


def test_one_measurement_group_per_finding(written) -> None:
    evidence, path = written
    sr = hd.sr.Comprehensive3DSR.from_dataset(pydicom.dcmread(path))
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    groups = sr.content.get_image_measurement_groups()
    assert [g.finding_type.value for g in groups] == ["50960005", "RID5036"]
    assert len({g.tracking_uid for g in groups}) == 2
    haemorrhage = groups[0]
    (probability,) = haemorrhage.get_measurements(name=codes.DCM.Probability)
    assert probability.value == pytest.approx(0.93)
    assert probability.unit == codes.UCUM.NoUnits
    (image,) = haemorrhage.source_images
    assert image.referenced_sop_instance_uid == evidence[len(evidence) // 2].SOPInstanceUID


def test_dciodvfy_reports_no_errors(written) -> None:
    _, path = written
    assert validators.dciodvfy_errors(path) == []


def test_dsrdump_shows_finding_and_algorithm(written) -> None:
    _, path = written
    dump = validators.dsrdump(path)
    for text in (HAEMORRHAGE.meaning, FRACTURE.meaning, MODEL.name, MODEL.version, "Probability"):
        assert text in dump


def test_pixelmed_sr_validator_reports_no_errors(written) -> None:
    _, path = written
    assert validators.pixelmed_sr_errors(path) == []


def test_same_inputs_give_the_same_sr_bytes() -> None:
    evidence = head_ct_series()
    first = encoded(build(evidence))
    again = encoded(build(list(reversed(head_ct_series())), result=result_for(evidence)))
    assert first == again


def test_other_inputs_give_another_sop_instance_uid() -> None:
    evidence = head_ct_series()
    assert build(evidence, "f1").SOPInstanceUID != build(evidence, "f2").SOPInstanceUID
    assert build(evidence, "f1").SeriesInstanceUID == build(evidence, "f2").SeriesInstanceUID


def test_several_models_each_get_groups_and_equipment() -> None:
    evidence = head_ct_series()
    first = result_for(evidence)
    other = dataclasses.replace(
        MODEL, id="fracture-ct", version="0.3.1", name="Skull fracture detector"
    )
    second = dataclasses.replace(first, model=other)
    sr = build_report(
        evidence=evidence,
        results=[second, first],
        inputs_fingerprint="f1",
        content_datetime=WHEN,
    )
    groups = hd.sr.Comprehensive3DSR.from_dataset(sr).content.get_image_measurement_groups()
    assert len(groups) == 4
    assert len({g.tracking_uid for g in groups}) == 4
    names = {
        item.ManufacturerModelName
        for item in sr.ContributingEquipmentSequence
        if item.PurposeOfReferenceCodeSequence[0].CodingSchemeDesignator == "99IHE"
    }
    assert names == {MODEL.name, other.name}
    assert sr.SOPInstanceUID == uids.sr_instance_uid(
        evidence[0].StudyInstanceUID, ["fracture-ct@0.3.1", "ich-ct@1.2.0"], "f1"
    )


def _with_finding(evidence: list[pydicom.Dataset], **changes: object) -> ModelResult:
    result = result_for(evidence)
    finding = result.findings[0]
    changed = Finding(**{**finding.__dict__, **changes})
    return ModelResult(
        result.model, result.series_instance_uid, result.input_sop_instance_uids, (changed,)
    )


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("no evidence", "evidence is empty"),
        ("no results", "results is empty"),
        ("no fingerprint", "inputs_fingerprint"),
        ("no findings", "'ich-ct@1.2.0' has no findings"),
        ("key image elsewhere", "'1.2.3.4' .* not among the evidence"),
        ("probability above one", "1.5"),
        ("two studies", "StudyInstanceUID"),
    ],
)
def test_invalid_inputs_are_refused(case: str, message: str) -> None:
    evidence = head_ct_series()
    results = [result_for(evidence)]
    fingerprint = "f1"
    if case == "no evidence":
        evidence = []
    elif case == "no results":
        results = []
    elif case == "no fingerprint":
        fingerprint = ""
    elif case == "no findings":
        results = [ModelResult(MODEL, evidence[0].SeriesInstanceUID, (), ())]
    elif case == "key image elsewhere":
        results = [_with_finding(evidence, key_sop_instance_uid="1.2.3.4")]
    elif case == "probability above one":
        results = [_with_finding(evidence, probability=1.5)]
    elif case == "two studies":
        evidence = evidence + ct_small()
    with pytest.raises(ValueError, match=message):
        build_report(evidence=evidence, results=results, inputs_fingerprint=fingerprint)


def with_fourth_slice(evidence: list[pydicom.Dataset]) -> list[pydicom.Dataset]:
    """The series after one more slice arrived."""
    fourth = copy.deepcopy(evidence[-1])
    fourth.SOPInstanceUID = uids.derived_uid("test-slice", evidence[-1].SOPInstanceUID, "4")
    fourth.InstanceNumber = 4
    return [*evidence, fourth]


def fingerprint_of(evidence: list[pydicom.Dataset]) -> str:
    return uids.fingerprint(ds.SOPInstanceUID for ds in evidence)


def supersede(
    evidence: list[pydicom.Dataset], predecessors: list[pydicom.Dataset]
) -> hd.sr.Comprehensive3DSR:
    return build_report(
        evidence=evidence,
        results=[result_for(evidence)],
        inputs_fingerprint=fingerprint_of(evidence),
        content_datetime=WHEN,
        predecessors=predecessors,
    )


@pytest.fixture(scope="module")
def superseding(tmp_path_factory: pytest.TempPathFactory):
    """(SR1 as stored, path of SR2): SR1 of three slices, SR2 after a fourth slice arrived."""
    first_slices = head_ct_series()
    stored = pydicom.dcmread(io.BytesIO(encoded(build(first_slices, fingerprint_of(first_slices)))))
    path = tmp_path_factory.mktemp("sr") / "superseding.dcm"
    supersede(with_fourth_slice(first_slices), [stored]).save_as(path, enforce_file_format=True)
    return stored, path


def test_superseding_sr_references_its_predecessor(superseding) -> None:
    first, path = superseding
    second = pydicom.dcmread(path)
    assert second.SOPInstanceUID != first.SOPInstanceUID
    assert second.SOPInstanceUID == uids.sr_instance_uid(
        first.StudyInstanceUID,
        ["ich-ct@1.2.0"],
        fingerprint_of(with_fourth_slice(head_ct_series())),
    )
    assert second.SeriesInstanceUID == first.SeriesInstanceUID
    assert second.StudyInstanceUID == first.StudyInstanceUID
    (study,) = second.PredecessorDocumentsSequence
    assert study.StudyInstanceUID == first.StudyInstanceUID
    (series,) = study.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == first.SeriesInstanceUID
    (instance,) = series.ReferencedSOPSequence
    assert instance.ReferencedSOPClassUID == first.SOPClassUID
    assert instance.ReferencedSOPInstanceUID == first.SOPInstanceUID


def test_sr_without_predecessors_has_no_predecessor_sequence(written) -> None:
    _, path = written
    assert "PredecessorDocumentsSequence" not in pydicom.dcmread(path)


def test_superseding_sr_passes_dciodvfy(superseding) -> None:
    _, path = superseding
    assert validators.dciodvfy_errors(path) == []


def test_superseding_sr_is_parsed_by_dsrdump(superseding) -> None:
    _, path = superseding
    assert HAEMORRHAGE.meaning in validators.dsrdump(path)


def test_superseding_sr_passes_pixelmed_sr_validator(superseding) -> None:
    _, path = superseding
    assert validators.pixelmed_sr_errors(path) == []


def test_predecessor_order_and_duplicates_do_not_change_the_sr() -> None:
    evidence = head_ct_series()
    earlier = [
        pydicom.dcmread(io.BytesIO(encoded(build(evidence, fingerprint))))
        for fingerprint in ("f1", "f2")
    ]
    later = with_fourth_slice(evidence)
    once = encoded(supersede(later, earlier))
    assert encoded(supersede(later, [earlier[1], earlier[0], earlier[1]])) == once
    (study,) = pydicom.dcmread(io.BytesIO(once)).PredecessorDocumentsSequence
    (series,) = study.ReferencedSeriesSequence
    assert len(series.ReferencedSOPSequence) == 2


def test_predecessor_from_another_study_is_refused_without_identifiers() -> None:
    other = ct_small()
    other_sr = pydicom.dcmread(io.BytesIO(encoded(build(other))))
    evidence = head_ct_series()
    with pytest.raises(ValueError, match="predecessor 0 belongs to another study") as refused:
        supersede(evidence, [other_sr])
    message = str(refused.value)
    for dataset in (evidence[0], other_sr):
        for attribute in ("PatientName", "PatientID", "StudyInstanceUID", "AccessionNumber"):
            value = str(dataset.get(attribute, ""))
            if value:
                assert value not in message, attribute


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("not an SR", "predecessor 0 is not an SR"),
        ("itself", "predecessor 0 is this SR itself"),
        ("other patient", "predecessor 0 has another PatientID"),
        ("no SOP Instance UID", "predecessor 0 has no SOPInstanceUID"),
    ],
)
def test_invalid_predecessors_are_refused(case: str, message: str) -> None:
    evidence = head_ct_series()
    predecessor = pydicom.dcmread(io.BytesIO(encoded(build(evidence, fingerprint_of(evidence)))))
    if case == "not an SR":
        predecessor = evidence[0]
    elif case == "other patient":
        predecessor.PatientID = "someone else"
    elif case == "no SOP Instance UID":
        del predecessor.SOPInstanceUID
    with pytest.raises(ValueError, match=message) as refused:
        supersede(evidence, [predecessor])
    assert str(evidence[0].PatientID) not in str(refused.value)


def test_validators_fail_loudly_on_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(AssertionError):
        validators.dsrdump(tmp_path / "missing.dcm")
