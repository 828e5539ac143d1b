"""Messaging with the RIS and the EHR: HL7 v2 orders in over MLLP (``listener``,
``orders``, ``intake``, ``store``), preliminary results out as HL7 v2 ORU^R01 over MLLP and as
FHIR DiagnosticReports."""
