"""De-identification of DICOM result objects (``deidentify`` / ``--deidentify``) under the PS3.15 Basic Profile.

Result objects carry only two kinds of source data: the Patient and Study modules copied from the source (so that
a PACS files them in the study) and the source's UIDs (references, Frame of Reference). :func:`deidentify` applies
the Basic Application Level Confidentiality Profile (PS3.15 E.1-1) to exactly those:

* every UID that is not a registered DICOM UID (SOP classes, transfer syntaxes, coding schemes) is replaced (action
  U) by :func:`neuroexplain.dicom.uids.keyed_uid`, an HMAC under the server's key: the same source UID gives the same
  new UID in every object of a study, and nobody without the key can link them;
* Patient's Name, Birth Date, Sex, Study Date/Time, Accession Number, Referring Physician, Study ID are emptied
  (action Z); Patient ID becomes a keyed pseudonym (a dummy, action D, consistent within the key); the other
  identifying Patient/Study attributes of Table E.1-1 are removed (action X), as are private elements;
* every remaining date/time becomes a fixed dummy (action D: no longitudinal temporal information is retained), and
  every person name anywhere is emptied;
* the method is recorded: Patient Identity Removed (0012,0062) ``YES``, De-identification Method (0012,0063) and
  its code sequence (0012,0064) with DCM 113100 "Basic Application Confidentiality Profile".

The key is read from a file the server configures (:func:`load_key`); without one, a request for de-identified
results is refused with a typed error.
"""

from __future__ import annotations

from pathlib import Path

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import UID_dictionary

from neuroexplain.dicom.uids import keyed_text, keyed_uid
from neuroexplain.errors import FailedPreconditionError, InvalidOptionError

MIN_KEY_BYTES = 16
MAX_KEY_BYTES = 4096
#: De-identification Method (0012,0063), LO: several values of at most 64 characters.
METHOD = ["PS3.15 E.1-1 Basic Application Level Confidentiality Profile", "UIDs remapped by keyed HMAC-SHA-256",
          "neuroexplain"]

#: Table E.1-1 attributes that may reach a result object through the copied Patient/Study modules.
_ZERO = ("PatientName", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "AccessionNumber",
         "ReferringPhysicianName", "StudyID")
_REMOVE = (
    "OtherPatientIDs", "OtherPatientIDsSequence", "OtherPatientNames", "PatientBirthName", "PatientBirthTime",
    "PatientAge", "PatientSize", "PatientWeight", "PatientAddress", "PatientMotherBirthName", "MilitaryRank",
    "BranchOfService", "MedicalRecordLocator", "PatientTelephoneNumbers", "EthnicGroup", "Occupation",
    "AdditionalPatientHistory", "PatientComments", "PatientReligiousPreference", "ResponsiblePerson",
    "ResponsibleOrganization", "PatientInsurancePlanCodeSequence", "PatientPrimaryLanguageCodeSequence",
    "CountryOfResidence", "RegionOfResidence", "MedicalAlerts", "Allergies", "SmokingStatus", "PregnancyStatus",
    "LastMenstrualDate", "SpecialNeeds", "PatientState", "IssuerOfPatientID", "IssuerOfPatientIDQualifiersSequence",
    "TypeOfPatientID", "PatientBreedDescription", "PatientSpeciesDescription", "ResponsiblePersonRole",
    "ReferencedPatientSequence", "ReferencedPatientPhotoSequence", "PatientSexNeutered", "QualityControlSubject",
    "StudyDescription", "PhysiciansOfRecord", "PhysiciansOfRecordIdentificationSequence",
    "NameOfPhysiciansReadingStudy", "PhysiciansReadingStudyIdentificationSequence",
    "ReferringPhysicianIdentificationSequence", "ReferringPhysicianAddress", "ReferringPhysicianTelephoneNumbers",
    "ReferencedStudySequence", "AdmittingDiagnosesDescription", "AdmittingDiagnosesCodeSequence",
    "RequestingService", "AdmissionID", "IssuerOfAdmissionIDSequence", "ServiceEpisodeID", "ServiceEpisodeDescription",
    "IssuerOfServiceEpisodeIDSequence", "ReasonForPerformedProcedureCodeSequence", "ProcedureCodeSequence",
    "ConsultingPhysicianName", "ConsultingPhysicianIdentificationSequence", "StudyComments",
    "ClinicalTrialSponsorName", "ClinicalTrialProtocolID", "ClinicalTrialProtocolName", "ClinicalTrialSiteID",
    "ClinicalTrialSiteName", "ClinicalTrialSubjectID", "ClinicalTrialSubjectReadingID", "ClinicalTrialTimePointID",
    "ClinicalTrialTimePointDescription", "InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName",
    "StationName", "OperatorsName", "PerformingPhysicianName", "RequestAttributesSequence",
)
_DUMMY = {"DA": "19700101", "TM": "000000", "DT": "19700101000000"}


def load_key(path: str | Path) -> bytes:
    """Read the de-identification key the server is configured with (``--deidentify-key-file``).

    Args:
        path: a file of at least 16 bytes (e.g. ``head -c 32 /dev/urandom > key``), kept secret.

    Returns:
        The key bytes.

    Raises:
        FailedPreconditionError: the file is missing, unreadable, shorter than 16 or longer than 4096 bytes.
    """
    p = Path(path)
    try:
        size = p.stat().st_size
        if size > MAX_KEY_BYTES:
            raise FailedPreconditionError(
                f"the de-identification key file has {size} bytes; expected {MIN_KEY_BYTES} to {MAX_KEY_BYTES}"
            )
        key = p.read_bytes()
    except OSError:
        raise FailedPreconditionError(
            "the de-identification key file cannot be read; configure a readable file of "
            f"{MIN_KEY_BYTES} to {MAX_KEY_BYTES} random bytes"
        ) from None
    if len(key) < MIN_KEY_BYTES:
        raise FailedPreconditionError(
            f"the de-identification key file has {len(key)} bytes; expected {MIN_KEY_BYTES} to {MAX_KEY_BYTES}"
        )
    return key


def check_key(key: bytes | None) -> bytes:
    """The key, or a typed refusal when de-identification was asked for and the server has none.

    Raises:
        FailedPreconditionError: no key configured.
        InvalidOptionError: a key shorter than 16 bytes.
    """
    if key is None:
        raise FailedPreconditionError(
            "deidentify was requested but this server has no de-identification key; the operator must configure "
            "a key file (16 to 4096 random bytes), or send the request without deidentify",
            field="deidentify",
        )
    if len(key) < MIN_KEY_BYTES:
        raise InvalidOptionError(f"the de-identification key has {len(key)} bytes; expected at least {MIN_KEY_BYTES}")
    return key


#: UIDs that name vocabularies and implementations, never a patient, study or instance: kept.
_KEEP_UIDS = frozenset({"CodingSchemeUID", "ContextUID", "MappingResourceUID", "ImplementationClassUID",
                        "TemplateExtensionOrganizationUID", "TemplateExtensionCreatorUID", "PrivateInformationCreatorUID"})


def _is_registered(uid: str) -> bool:
    return uid in UID_dictionary or uid.startswith("1.2.840.10008.")


def _remap_element(elem: DataElement, key: bytes) -> None:
    if elem.VR == "UI" and elem.value and elem.keyword not in _KEEP_UIDS:
        values = elem.value if elem.VM > 1 else [elem.value]
        new = [v if _is_registered(str(v)) else keyed_uid(str(v), key) for v in values]
        elem.value = new if elem.VM > 1 else new[0]
    elif elem.VR in _DUMMY and elem.value:
        elem.value = _DUMMY[elem.VR]
    elif elem.VR == "PN":
        elem.value = ""


def _walk(ds: Dataset, key: bytes) -> None:
    for tag in list(ds.keys()):
        if tag.is_private:
            del ds[tag]
            continue
        elem = ds[tag]
        if elem.VR == "SQ":
            for item in elem.value:
                _walk(item, key)
        else:
            _remap_element(elem, key)


def deidentify(ds: Dataset, key: bytes) -> Dataset:
    """De-identify a result object in place (Basic Profile, UIDs keyed) and record the method.

    Args:
        ds: a result object built by :mod:`neuroexplain.dicom.results` (Patient/Study copied from the source).
        key: the server's de-identification key (:func:`load_key`).

    Returns:
        ``ds``, de-identified.
    """
    key = check_key(key)
    patient_id = str(ds.get("PatientID", "") or "")
    for keyword in _REMOVE:
        if keyword in ds:
            delattr(ds, keyword)
    _walk(ds, key)
    for keyword in _ZERO:
        if keyword in ds:
            ds[keyword].value = ""
    ds.PatientID = keyed_text(patient_id, key) if patient_id else ""
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = list(METHOD)
    code = Dataset()
    code.CodeValue = "113100"
    code.CodingSchemeDesignator = "DCM"
    code.CodeMeaning = "Basic Application Confidentiality Profile"
    ds.DeidentificationMethodCodeSequence = Sequence([code])
    meta = getattr(ds, "file_meta", None)
    if meta is not None and "MediaStorageSOPInstanceUID" in meta:
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds
