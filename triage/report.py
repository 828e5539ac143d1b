"""The DICOM SR the service writes back into a study: one Comprehensive 3D SR per analysis.

Content follows TID 1500 "Imaging Measurement Report" built from highdicom templates; the header
follows IHE AI Results (Contributing Equipment names each algorithm). See DESIGN.md, "Standards
the output follows".
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

import highdicom as hd
import pydicom
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import ExplicitVRLittleEndian

from triage import __version__, uids
from triage.copying.header import identifier_text, source_header
from triage.errors import InvalidInput
from triage.findings import Finding, ModelIdentity, ModelResult

MANUFACTURER = "Triage"
SERIES_DESCRIPTION = "AI triage result (unverified)"
# Fixed so every SR the service writes into a study lands in one, recognisable series.
SERIES_NUMBER = 7100

# IHE AI Results, Contributing Equipment Sequence: Purpose of Reference of an AI algorithm.
PROCESSING_ALGORITHM = Code("Newcode1", "99IHE", "Processing Algorithm")
# DCM 122157 "Probability"; value between 0 and 1, so UCUM "1" (no units).
PROBABILITY = codes.DCM.Probability
NO_UNITS = codes.UCUM.NoUnits

# Procedure Reported (TID 1500, CID 100) by modality. CID 100 is extensible, but the SR
# validator we check against rejects codes outside it (e.g. LN 24725-4 "Head CT"), so the body
# region stays unspecified.
_PROCEDURE_BY_MODALITY = {
    "CT": codes.LN.CTUnspecifiedBodyRegion,
    "MR": codes.LN.MRIUnspecifiedBodyRegion,
    "CR": codes.LN.XRUnspecifiedBodyRegion,
    "DX": codes.LN.XRUnspecifiedBodyRegion,
    "NM": codes.LN.NMUnspecifiedBodyRegion,
    "PT": codes.LN.PETUnspecifiedBodyRegion,
}


def build_report(
    *,
    evidence: Sequence[pydicom.Dataset],
    results: Sequence[ModelResult],
    inputs_fingerprint: str,
    content_datetime: dt.datetime | None = None,
    predecessors: Sequence[pydicom.Dataset] = (),
    site_zone: dt.tzinfo = dt.UTC,
) -> hd.sr.Comprehensive3DSR:
    """Build the SR of one analysis of one study.

    ``evidence`` are the headers of the source instances (same patient, same study); patient
    and study attributes are copied from them, identifiers exactly and everything else made
    valid for its VR (``triage.copying.header``), and the SR goes in a new series of that
    study. UIDs are derived from the study, the models (``id@version``) and
    ``inputs_fingerprint``, so a retried job writes the same SR. ``content_datetime`` (aware;
    naive means UTC) defaults to now; a retry passes the original one to reproduce the SR
    exactly. Dates and times are written at the source's UTC offset, or at ``site_zone``'s
    offset at the time of the study.

    ``predecessors`` are the earlier SRs of the same study that this one supersedes (a
    re-analysis after more instances arrived); they are referenced in the Predecessor Documents
    Sequence (PS3.3 C.17.2). They do not change this SR's UIDs, which follow from its inputs.

    Raises ``ValueError`` naming the offending value when the inputs cannot make a valid SR.
    """
    _check_inputs(evidence, results, inputs_fingerprint)
    # Input order must not change the SR: a retry may list instances or models differently.
    evidence = sorted(evidence, key=lambda ds: (ds.SeriesInstanceUID, ds.SOPInstanceUID))
    results = sorted(results, key=lambda r: _model_key(r.model))
    header = source_header(evidence[0], site_zone=site_zone, created=content_datetime,
                           own_texts=[t for r in results for t in _own_texts(r)])
    when = header.when
    study_uid = str(header.dataset.StudyInstanceUID)
    sop_instance_uid = uids.sr_instance_uid(
        study_uid, [_model_key(r.model) for r in results], inputs_fingerprint
    )
    previous_versions = _check_predecessors(predecessors, evidence[0], sop_instance_uid)
    groups = [
        _measurement_group(sop_instance_uid, result.model, finding)
        for result in results
        for finding in result.findings
    ]
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(
            observer_device_context=_device_observer([r.model for r in results])
        ),
        procedure_reported=procedure_reported(header.dataset),
        imaging_measurements=groups,
    )
    try:
        sr = hd.sr.Comprehensive3DSR(
            # highdicom copies the first instance's header (here the cleaned copy) and reads
            # only the UIDs of the others, to reference them.
            evidence=[header.dataset, *evidence[1:]],
            content=report[0],
            series_instance_uid=uids.sr_series_uid(study_uid),
            series_number=SERIES_NUMBER,
            sop_instance_uid=sop_instance_uid,
            instance_number=1,
            manufacturer=MANUFACTURER,
            manufacturer_model_name=MANUFACTURER,
            software_versions=__version__,
            series_description=SERIES_DESCRIPTION,
            is_complete=True,
            is_final=False,
            is_verified=False,
            contributing_equipment=[_algorithm_equipment(r.model, when) for r in results],
            content_date=when.date(),
            content_time=when.time(),
            series_date=when.date(),
            series_time=when.time(),
            previous_versions=previous_versions or None,
            specific_character_set=None,  # set by header.finish
            # Explicit VR: an identifier keeps the VR the source gave it (triage.copying.header).
            transfer_syntax_uid=ExplicitVRLittleEndian,
        )
    except KeyError as exc:  # highdicom knows the modules of standard storage classes only
        raise InvalidInput("the images are of a storage class (SOP Class UID) that the "
                           "result report cannot describe") from exc
    header.pin_times(sr)
    _deidentification(sr, header.dataset)
    header.finish(sr)
    return sr


def _own_texts(result: ModelResult) -> list[str]:
    """The texts of a model and its findings that the SR carries."""
    model = result.model
    return [model.name, model.manufacturer, model.version,
            *(f.concept.meaning for f in result.findings)]


def _deidentification(sr: hd.sr.Comprehensive3DSR, source: pydicom.Dataset) -> None:
    """Keep Patient Identity Removed only with the method that the Patient Module requires.

    Patient Identity Removed (Type 3) makes De-identification Method (Type 1C) mandatory.
    Some de-identified sources state the first without the second; the SR then carries
    neither rather than repeat the source's error.
    """
    if sr.get("PatientIdentityRemoved") != "YES":
        return
    methods = ("DeidentificationMethod", "DeidentificationMethodCodeSequence")
    for keyword in methods:
        if keyword in source and keyword not in sr:
            setattr(sr, keyword, source[keyword].value)
    if not any(keyword in sr for keyword in methods):
        del sr.PatientIdentityRemoved


def procedure_reported(source: pydicom.Dataset) -> Code:
    """TID 1500 Procedure Reported for a source series, from its modality."""
    modality = str(source.get("Modality", "")).upper()
    return _PROCEDURE_BY_MODALITY.get(modality, codes.SCT.ImagingProcedure)


def tracking_identifier(model: ModelIdentity, finding: Finding) -> str:
    """Human-readable Tracking Identifier (DCM 112039) of a finding's measurement group."""
    return f"{_model_key(model)} {finding.concept.scheme}:{finding.concept.value}"


def _check_inputs(
    evidence: Sequence[pydicom.Dataset], results: Sequence[ModelResult], inputs: str
) -> None:
    if not evidence:
        raise ValueError("evidence is empty: an SR needs the source instances it reports on")
    if not results:
        raise ValueError("results is empty: an SR needs at least one model result")
    if not inputs:
        raise ValueError(f"inputs_fingerprint must not be empty, got {inputs!r}")
    for attribute in ("StudyInstanceUID", "PatientID"):
        values = {identifier_text(ds, attribute) for ds in evidence}
        if len(values) != 1:
            # Count only: the values are patient identifiers and errors end up in logs.
            raise ValueError(f"evidence mixes {len(values)} different {attribute} values")
    source_uids = {str(ds.SOPInstanceUID) for ds in evidence}
    for result in results:
        if not result.findings:
            raise ValueError(f"result of model {_model_key(result.model)!r} has no findings")
        for finding in result.findings:
            if not 0.0 <= finding.probability <= 1.0:
                raise ValueError(
                    f"probability of {finding.concept.meaning!r} is {finding.probability!r}, "
                    "outside [0, 1]"
                )
            if finding.key_sop_instance_uid not in source_uids:
                raise ValueError(
                    f"key image {finding.key_sop_instance_uid!r} of "
                    f"{finding.concept.meaning!r} is not among the evidence"
                )


def _check_predecessors(
    predecessors: Sequence[pydicom.Dataset], source: pydicom.Dataset, sop_instance_uid: str
) -> list[pydicom.Dataset]:
    """The predecessors to reference: checked, without duplicates, in a stable order.

    Messages name the position of the offending predecessor only: its UIDs and patient
    attributes identify the patient and errors end up in logs.
    """
    unique: dict[str, pydicom.Dataset] = {}
    for position, predecessor in enumerate(predecessors):
        name = f"predecessor {position}"
        for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
            if not predecessor.get(keyword):
                raise ValueError(f"{name} has no {keyword}")
        if predecessor.get("Modality") != "SR":
            raise ValueError(
                f"{name} is not an SR document (Modality {predecessor.get('Modality')!r})"
            )
        if predecessor.StudyInstanceUID != source.StudyInstanceUID:
            raise ValueError(
                f"{name} belongs to another study than the evidence "
                "(StudyInstanceUID differs); an SR supersedes SRs of its own study only"
            )
        if identifier_text(predecessor, "PatientID") != identifier_text(source, "PatientID"):
            raise ValueError(f"{name} has another PatientID than the evidence")
        if predecessor.SOPInstanceUID == sop_instance_uid:
            raise ValueError(
                f"{name} is this SR itself (same models and inputs_fingerprint); "
                "an SR cannot supersede itself"
            )
        unique[str(predecessor.SOPInstanceUID)] = predecessor
    # Input order must not change the SR, as for the evidence.
    return sorted(unique.values(), key=lambda ds: (ds.SeriesInstanceUID, ds.SOPInstanceUID))


def _model_key(model: ModelIdentity) -> str:
    return f"{model.id}@{model.version}"


def _device_uid(model: ModelIdentity) -> str:
    return uids.derived_uid("device", model.id, model.version, model.weights_sha256)


def _measurement_group(
    sop_instance_uid: str, model: ModelIdentity, finding: Finding
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """TID 1501 group: the finding, its probability, the algorithm and the key image."""
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=uids.derived_uid(
                "tracking",
                sop_instance_uid,
                _model_key(model),
                finding.concept.scheme,
                finding.concept.value,
            ),
            identifier=tracking_identifier(model, finding),
        ),
        finding_type=Code(finding.concept.value, finding.concept.scheme, finding.concept.meaning),
        algorithm_id=_algorithm_identification(model),
        measurements=[
            hd.sr.Measurement(name=PROBABILITY, value=finding.probability, unit=NO_UNITS)
        ],
        source_images=[
            hd.sr.SourceImageForMeasurementGroup(
                referenced_sop_class_uid=finding.key_sop_class_uid,
                referenced_sop_instance_uid=finding.key_sop_instance_uid,
            )
        ],
    )


def _algorithm_identification(model: ModelIdentity) -> hd.sr.AlgorithmIdentification:
    """TID 4019 Algorithm Identification."""
    return hd.sr.AlgorithmIdentification(name=model.name, version=model.version)


def _device_observer(models: Sequence[ModelIdentity]) -> hd.sr.ObserverContext:
    """TID 1004 device observer: the algorithm, or the product when several algorithms ran."""
    if len(models) == 1:
        (model,) = models
        attributes = hd.sr.DeviceObserverIdentifyingAttributes(
            uid=_device_uid(model),
            name=model.name,
            manufacturer_name=model.manufacturer,
            model_name=model.name,
        )
    else:
        attributes = hd.sr.DeviceObserverIdentifyingAttributes(
            uid=uids.derived_uid("device", *sorted(_model_key(m) for m in models)),
            name=MANUFACTURER,
            manufacturer_name=MANUFACTURER,
            model_name=MANUFACTURER,
        )
    return hd.sr.ObserverContext(
        observer_type=codes.DCM.Device, observer_identifying_attributes=attributes
    )


def _algorithm_equipment(model: ModelIdentity, when: dt.datetime) -> hd.ContributingEquipment:
    """IHE AI Results Contributing Equipment item naming one algorithm."""
    equipment = hd.ContributingEquipment(
        manufacturer=model.manufacturer,
        purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=model.name,
        software_versions=model.version,
        contribution_datetime=when,
    )
    # highdicom admits only CID 7005 purposes; IHE AIR asks for its own code (CID 7005 is
    # extensible), so the item is built as processing equipment and then given that code.
    equipment.PurposeOfReferenceCodeSequence = [hd.sr.CodedConcept.from_code(PROCESSING_ALGORITHM)]
    equipment.DeviceUID = _device_uid(model)
    return equipment
