"""PACS-side AI triage service.

Studies arriving in Orthanc are analysed by ONNX models; results go back into the study as
DICOM Structured Reports (TID 1500, IHE AI Results) and into a prioritised worklist.
"""

__version__ = "0.1.0"
